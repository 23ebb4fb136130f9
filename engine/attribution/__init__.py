"""Which program owns a flow: the local socket behind a 5-tuple and the process behind that socket.

``sock_diag.py`` (the netlink messages, sans-IO) and ``procfs.py`` (what /proc says, parsers sans-IO)
are the two halves of the lookup; ``local_sockets.py`` is the I/O edge that ``dnsgate run`` uses and
``command.py`` the trivial source of ``dnsgate exec`` (every flow is the command's). engine/owner.py
holds the :class:`~engine.owner.Owner` record the rest of the engine shows; docs/attribution.md has the
design and its costs.
"""
