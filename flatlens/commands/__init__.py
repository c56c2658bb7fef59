"""One module per ``flatlens`` subcommand; each defines ``add_parser(subparsers)``."""
