"""`python -m proxy` is the `mcp-authproxy` program."""

from .cli.main import main_entry

main_entry()
