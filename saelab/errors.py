"""Errors a user can fix, and the helpers that word them.

`UsageError` covers bad input: flags, files, configs, stores, checkpoints. `DivergedError` (exit 1)
is a training run that went NaN/inf. The CLI prints its message
without a traceback and exits with code 2. `DataError` (a UsageError) is a damaged or foreign file
found where saelab's own data should be (a chunk or checkpoint that fails its checksum, an
unreadable cfg.json): same message rule, exit code 1. Anything else is a bug in saelab and keeps
its traceback.

Messages follow one pattern: what was wrong, what was expected, how to fix it.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_USAGE = 2
EXIT_DATA = 1


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message and exits with code 2."""

    exit_code = EXIT_USAGE


class DataError(UsageError):
    """A data fault: a file saelab wrote (or should have) is damaged, missing or foreign. Exit code 1."""

    exit_code = EXIT_DATA


class DivergedError(UsageError):
    """Training diverged: NaN or inf in the loss, a gradient or a weight (usually too high a learning
    rate). The message names the step and the tensor and which checkpoint was kept. Exit code 1."""

    exit_code = EXIT_DATA


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' Did you mean "{close[0]}"?' if close else ""


def raise_all(problems: list[str], header: str) -> None:
    """Raise one UsageError listing every problem, so the user can fix them in one pass."""
    if not problems:
        return
    if len(problems) == 1:
        raise UsageError(f"{header}: {problems[0]}")
    raise UsageError(header + ":\n" + "\n".join(f"  - {p}" for p in problems))
