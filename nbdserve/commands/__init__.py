"""Subcommands of `nbdserve`, one module each (see nbdserve.cli.COMMANDS)."""
