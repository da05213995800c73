"""`python -m proxy` is the `mcp-authproxy` program."""

from .cli import main_entry

main_entry()
