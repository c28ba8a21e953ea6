"""The package's expected errors: one base class, so the ``imm`` command prints them as one line and
lets anything else (a bug) raise with its traceback.

Each also derives from the built-in exception it replaces, so ``except ValueError`` (or
``FileNotFoundError``, ``ImportError``, ``RuntimeError``) keeps catching it.
"""
from __future__ import annotations

import difflib


class ImmError(Exception):
    """Base class: an error the user can act on (bad input, a missing file or package, a run that cannot
    go on), with a message that says what to do."""


class InputError(ImmError, ValueError):
    """A value, setting or file content that is not acceptable."""


class MissingError(ImmError, FileNotFoundError):
    """A file, folder, dataset or download that is not there."""


class MissingPackageError(ImmError, ImportError):
    """An optional package that this feature needs is not installed."""


class StateError(ImmError, RuntimeError):
    """A run, archive or dataset in a state the command cannot continue from."""


class ConfigError(InputError):
    """A config file, preset name, key or override that cannot be used."""


def did_you_mean(key: str, candidates, prefix: str = "") -> str:
    """``"; did you mean 'PREFIX.NEAREST'?"`` for the nearest candidate, or ``""`` when none is close."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def printable(text) -> str:
    """``text`` with its control characters (terminal escapes, newlines, carriage returns) shown as ``\\xNN``
    escapes: text that came from a file (an entry name, a member name, a config value) printed as it is could
    move the cursor, recolour or rewrite the terminal, or fake a second line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
