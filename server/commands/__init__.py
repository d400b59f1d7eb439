"""CLI subcommands; each module exports `register(subparsers)`."""
