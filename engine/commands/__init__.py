"""One module per ``dnsgate`` sub-command: ``add_parser(subparsers)`` and ``run(args) -> int``."""
