"""The recipes' command lines: one spelling of the shared options and one-line usage errors.

Every recipe in ``recipes/`` names the shared options the same way:

| option | meaning |
| --- | --- |
| ``--output-dir DIR`` | the run's output folder (``output_dir`` in the config-driven recipes) |
| ``--output FILE`` | a single output file |
| ``--threads N`` | torch CPU threads |
| ``--no-progress`` | no progress bars |
| ``--shard i/n`` | this shard of n (``0 <= i < n``) |

A bad option, override or setting ends the recipe with one line on stderr, naming the key and
what it accepts, and exit code 2 (as argparse's own errors), never a traceback:
`RecipeArgumentParser` for the command line, `usage_errors` around reading the config. Old
spellings (`DeprecatedAlias`) keep working for one release with a `FutureWarning`.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any, NoReturn

__all__ = [
    "DeprecatedAlias",
    "RecipeArgumentParser",
    "add_output_dir",
    "add_progress",
    "add_shard",
    "add_threads",
    "one_line",
    "parse_shard",
    "positive_int",
    "usage_errors",
]


def one_line(message: object) -> str:
    """``message`` as one line: runs of whitespace (newlines included) become one space.

    Example:
        >>> one_line("Expected `x`\\n  to be positive.")
        'Expected `x` to be positive.'
    """
    return " ".join(str(message).split())


class RecipeArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line on stderr and exit code 2: the
    message, and for an unknown option the closest accepted one and all of them. Options are
    taken only as spelt (no abbreviations: ``--output`` is not silently ``--output-dir``).

    Example:
        >>> parser = RecipeArgumentParser(prog="demo.py")
        >>> _ = parser.add_argument("--steps", type=int)
        >>> with contextlib.redirect_stderr(sys.stdout):
        ...     try:
        ...         parser.parse_args(["--stepz", "3"])
        ...     except SystemExit as exit:
        ...         print("exit code", exit.code)
        demo.py: error: unrecognized arguments: --stepz 3; did you mean --steps? accepted: -h, --help, --steps
        exit code 2
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def accepted_options(self) -> list[str]:
        """Every option string the parser takes (deprecated aliases left out)."""
        return [name for action in self._actions if action.help != argparse.SUPPRESS for name in action.option_strings]

    def error(self, message: str) -> NoReturn:
        """Prints ``<prog>: error: <message>`` on one line and exits with code 2."""
        message = one_line(message)
        if message.startswith("unrecognized arguments:"):
            accepted = self.accepted_options()
            unknown = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("-")]
            close = difflib.get_close_matches(unknown[0], accepted, n=1) if unknown else []
            hint = f"; did you mean {close[0]}?" if close else ""
            message = f"{message}{hint} accepted: {', '.join(accepted)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and warns
    (`FutureWarning`) that it goes after one release. Add it with ``help=argparse.SUPPRESS``,
    ``new="--new-name"`` and, for a flag, ``nargs=0, const=True``.

    Example:
        >>> parser = RecipeArgumentParser(prog="demo.py")
        >>> _ = parser.add_argument("--output-dir")
        >>> _ = parser.add_argument("--out", dest="output_dir", action=DeprecatedAlias, new="--output-dir",
        ...                         help=argparse.SUPPRESS)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     parser.parse_args(["--out", "runs/a"]).output_dir, str(caught[0].message)
        ('runs/a', '--out is deprecated and will be removed after mosaic_kit 0.1; use --output-dir')
    """

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed after mosaic_kit 0.1; use {self.new}",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n`` (an `argparse` type: bad text is a usage error).

    Example:
        >>> parse_shard("1/4")
        (1, 4)
        >>> parse_shard("4/4")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected i/n with 0 <= i < n, but got '4/4'
    """
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, but got {text!r}")
    return int(match.group(1)), int(match.group(2))


def positive_int(text: str) -> int:
    """An int >= 1 (an `argparse` type).

    Example:
        >>> positive_int("3")
        3
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a positive int, but got '0'
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, but got {text!r}")
    return value


def add_output_dir(parser: argparse.ArgumentParser, help: str, default: Any = None, deprecated: tuple[str, ...] = (),
                   **kwargs: Any) -> None:
    """``--output-dir DIR`` (dest ``output_dir``), with old spellings as `DeprecatedAlias`."""
    parser.add_argument("--output-dir", default=default, metavar="DIR", help=help, **kwargs)
    for old in deprecated:
        parser.add_argument(old, dest="output_dir", action=DeprecatedAlias, new="--output-dir",
                            help=argparse.SUPPRESS, **kwargs)


def add_threads(parser: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    """``--threads N``: torch CPU threads (dest ``threads``; None: leave torch's setting)."""
    parser.add_argument("--threads", type=positive_int, default=default, metavar="N",
                        help=help or f"torch CPU threads (default {default if default else 'torch’s own'})")


def add_progress(parser: argparse.ArgumentParser, deprecated: tuple[str, ...] = ()) -> None:
    """``--no-progress`` (dest ``no_progress``), with old spellings as `DeprecatedAlias`."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for old in deprecated:
        parser.add_argument(old, dest="no_progress", action=DeprecatedAlias, new="--no-progress", nargs=0,
                            const=True, help=argparse.SUPPRESS)


def add_shard(parser: argparse.ArgumentParser, help: str = "i/n: this shard of n (0 <= i < n)") -> None:
    """``--shard i/n`` (dest ``shard``, default ``(0, 1)``)."""
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/n", help=help)


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser, *extra: type[BaseException]) -> Iterator[None]:
    """Turns a `ValueError`, `TypeError` or `OSError` (and ``extra`` types) raised while the
    recipe reads its options and config into ``parser.error``: one line, exit code 2.

    Example:
        >>> parser = RecipeArgumentParser(prog="demo.py")
        >>> with contextlib.redirect_stderr(sys.stdout):
        ...     try:
        ...         with usage_errors(parser):
        ...             raise ValueError("Unknown settings ['bogus']; expected among ['max_steps', 'seed'].")
        ...     except SystemExit as exit:
        ...         print("exit code", exit.code)
        demo.py: error: Unknown settings ['bogus']; expected among ['max_steps', 'seed'].
        exit code 2
    """
    try:
        yield
    except (ValueError, TypeError, OSError, *extra) as error:
        parser.error(str(error) or type(error).__name__)
