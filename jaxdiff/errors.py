"""The user's mistakes: one hierarchy under `JaxdiffError`, each raised with a one-line message naming the bad
value (or file) and what is allowed.

Kinds:

- `ConfigError`: a config key that does not exist, or a value (or combination of values) it does not allow.
- `DataError`: a dataset, image folder, caption file or batch of inputs that cannot be used.
- `WeightsError`: a weights file, checkpoint, workdir or converter's input that is missing, damaged or does not
  fit; `MissingWeightsError` when the file or folder is not there.
- `UsageError`: a bad argument to a library function or a bad command-line flag; `OutputExistsError` when it
  names an output that already exists.
- `MissingDataError`: a dataset or image folder that is not there (a `DataError`).
- `TrainingDivergedError`: training stopped because the loss or gradients stopped being finite (the settings,
  e.g. a learning rate too high, are to blame).

Every kind except `TrainingDivergedError` also subclasses `ValueError` (the missing-file kinds also
`FileNotFoundError`, `OutputExistsError` also `FileExistsError`), so callers that catch those keep working; `TrainingDivergedError` subclasses
`FloatingPointError`. Library callers catch `JaxdiffError` to tell a bad input from a bug; the `jaxdiff` command
answers only these with exit status 2 and one line on stderr, and any other exception as an internal error.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "JaxdiffError",
    "MissingDataError",
    "MissingWeightsError",
    "OutputExistsError",
    "TrainingDivergedError",
    "UsageError",
    "WeightsError",
]


class JaxdiffError(Exception):
    """The user's mistake: bad input, named in one line."""


class ConfigError(JaxdiffError, ValueError):
    """A config key that does not exist, or a value its spec does not allow."""


class DataError(JaxdiffError, ValueError):
    """A dataset, image folder, caption or input batch that cannot be used."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset or image folder that is not where it was looked for."""


class WeightsError(JaxdiffError, ValueError):
    """A weights file, checkpoint, workdir or converter's input that is damaged or does not fit."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A weights file, checkpoint or workdir that does not exist."""


class UsageError(JaxdiffError, ValueError):
    """A bad argument to a library function, or a bad command-line flag."""


class OutputExistsError(UsageError, FileExistsError):
    """An output file or folder that already exists and would be overwritten."""


class TrainingDivergedError(JaxdiffError, FloatingPointError):
    """Training stopped because its loss or gradients were no longer finite."""
