"""`relvid` subcommands beyond training: each module has ``register(subparsers)``."""
