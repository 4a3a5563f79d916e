"""CLI subcommands, one module each (see sdtune/cli.py)."""
