"""The command line's own mistakes: `UsageError` (`jaxdiff.errors.UsageError`), raised by the checks of a verb's
arguments before any work (a user's error: exit status 2 and one line on stderr), and the check that no argument
was left unrecognised."""

from __future__ import annotations

from jaxdiff.errors import UsageError


def reject_extra(extra: list[str]) -> None:
    """UsageError naming the arguments the verb did not recognise, if any."""
    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
