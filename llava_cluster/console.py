"""Shared rich consoles: results to stdout, diagnostics and progress to stderr."""

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # messages: never split a path across lines


def print_message(label: str, style: str, message: str) -> None:
    """`label: message` on stderr. The message is escaped: it quotes user text and patterns such as
    `[a-z0-9]`, which rich would otherwise take as markup and drop."""
    err_console.print(f"[{style}]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)
