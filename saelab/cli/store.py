"""`saelab` subcommands for the store stage (being written)."""
from __future__ import annotations


def register(sub) -> None:
    """Add this stage's subcommands to the `saelab` parser."""
