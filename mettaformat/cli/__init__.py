"""The ``mettaformat`` command. Each subcommand is a thin module: parse, call the library, print."""
