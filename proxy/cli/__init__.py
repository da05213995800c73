"""The command line: `run`, `status`, `demo` (and the console script's entry point)."""

from .main import main, main_entry

__all__ = ["main", "main_entry"]
