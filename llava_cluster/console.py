"""Shared rich consoles: results to stdout, diagnostics and progress to stderr."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # messages: never split a path across lines
