"""One module per `yi-local` subcommand: `add_arguments(parser)` and `run(args) -> exit code`."""
