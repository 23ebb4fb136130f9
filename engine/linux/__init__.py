"""Linux integration: namespaces (:mod:`engine.linux.netns`), routes, policy routing, loop avoidance.

Nothing here is on the packet path; these modules shell out to iproute2 or switch namespaces at setup.
"""
