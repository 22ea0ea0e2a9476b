"""The `jaxdiff` command: train | sample | eval | convert | data | info.

`--config` takes a config file (an ml_collections file defining `get_config()`)
or a recipe name (`jaxdiff.config.recipes.RECIPES`); any key can be overridden as
`--config.section.key=value`, and the result is validated before anything runs.

A user's mistake (bad value, bad file, bad path, missing data: a
`jaxdiff.errors.JaxdiffError`) ends with exit status 2 and one line on stderr;
any other exception is an internal error: status 1, a request to report it and
the traceback. `-v/--verbose` adds the traceback to every error
and shows all libraries' log messages.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback

from jaxdiff.cli.config_source import load_config
from jaxdiff.cli.errors import UsageError
from jaxdiff.cli.parser import build_parser
from jaxdiff.cli.paths import check_output_dir, check_output_file
from jaxdiff.cli.sampler_flags import SAMPLER_OPTIONS
from jaxdiff.errors import JaxdiffError

__all__ = [
    "LIBRARY_LOGGERS",
    "SAMPLER_OPTIONS",
    "UsageError",
    "build_parser",
    "check_output_dir",
    "check_output_file",
    "command_logging",
    "load_config",
    "main",
]

logger = logging.getLogger("jaxdiff")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a value, a file, a path, missing data) rather than a bug: `JaxdiffError`
    only, which the library raises where it checks the user's input (argparse answers its own mistakes)."""
    return (JaxdiffError,)


LIBRARY_LOGGERS = ("absl", "orbax", "jax")


@contextlib.contextmanager
def command_logging(verbose: bool):
    """For one command: jaxdiff's messages at INFO and other libraries' (absl, orbax, jax) at WARNING on stderr;
    with `verbose`, jaxdiff's at DEBUG and everyone's at INFO. The previous logging set-up is restored after.

    The handler goes on the root logger before any library logs, so absl does not install its own; plain
    console handlers a library installed on import are set aside, so nothing is printed twice.
    """
    root = logging.getLogger()
    named = [logger, *map(logging.getLogger, LIBRARY_LOGGERS)]
    saved_levels = [(item, item.level) for item in (root, *named)]
    set_aside = [handler for handler in root.handlers if type(handler) is logging.StreamHandler]
    for handler in set_aside:
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(name)s: %(message)s"
    ))  # fmt: skip
    root.addHandler(console)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(console)
        for handler in set_aside:
            root.addHandler(handler)
        for item, level in saved_levels:
            item.setLevel(level)


def _one_line(err: BaseException) -> str:
    """The error's message on one line: lines joined by "; " (by a space after punctuation)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = ""
    for line in filter(None, (line.strip() for line in str(text).splitlines())):
        message += ("" if not message else " " if message[-1] in ".:;," else "; ") + line
    return message or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    with command_logging(args.verbose):
        try:
            return args.run(args, extra)
        except _user_errors() as err:
            if args.verbose:
                traceback.print_exc()
            print(f"jaxdiff: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except Exception as err:  # noqa: BLE001 - everything else is a bug: say so, with the traceback
            traceback.print_exc()
            print(f"jaxdiff: internal error ({type(err).__name__}: {_one_line(err)}); this is a bug, please report it",
                  file=sys.stderr)  # fmt: skip
            return 1
