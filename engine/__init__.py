"""dnsgate engine: the feature-free core (packets, flows, hooks, profiles, packet loop, I/O).

Every feature lives in a plugin under ``plugins/``; the engine only knows the hook contract in
:mod:`engine.hookspecs`.
"""

__version__ = "0.1.0"

from engine import compiled as _compiled

_compiled.install()  # the compiled build's import hook, before any per-packet module loads (engine/compiled.py)
