"""One module per ``dnsgate`` sub-command: ``add_parser(subparsers)`` and ``run(args) -> int``.

``serving`` is not a command: it holds what ``serve``, ``run`` and ``exec`` share (the engine's serving
loop, argument and logging helpers), so that no command module imports another.
"""
