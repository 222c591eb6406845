"""Exception hierarchy: the CLI turns every GentraceError into one line on stderr and an exit code."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GentraceError(Exception):
    """Base of every error gentrace reports to a user; exit_code is what the CLI exits with."""

    exit_code = 1


class ConfigError(GentraceError):
    """A config file, a `--set` override or a CLI argument is wrong; names the key path."""

    exit_code = 2


class DataError(GentraceError):
    """A data set cannot be read (missing files, impossible sizes); says where to put the files."""

    exit_code = 2


class StoreError(GentraceError):
    """A store path is unusable: exists, foreign, locked, or damaged."""

    exit_code = 2


class MissingStreamError(StoreError):
    """The store does not hold a stream an analysis needs; names the config key that records it."""


class SchemaVersionError(StoreError):
    """The store was written by a newer gentrace schema than this one reads."""


class DamagedStoreError(StoreError):
    """A chunk, checkpoint or metadata file inside the committed rows is missing or fails its checksum.

    The message names the array and rows and says to run `gentrace verify`; damage is never read as numbers.
    """

    exit_code = 1


class AnalysisInputError(GentraceError):
    """An analysis was asked for something the store cannot answer."""

    exit_code = 2


class TrainingDiverged(GentraceError):
    """The loss became NaN or infinite; the store is kept with status `diverged`."""

    exit_code = 1


class WriterError(GentraceError):
    """The background store writer failed (full disk, permissions); nothing committed is lost."""

    exit_code = 1


class PeerFailed(GentraceError):
    """Under torchrun: another rank failed before training started; it reports why, this rank only stops."""

    exit_code = 1


def did_you_mean(given: str, known: Iterable[str]) -> str:
    """`did you mean `lr`? ` for the known name closest to a mistyped one (difflib's ratio >= 0.6), else ``.

    Errors that list the known names put it before the list:
    "unknown config key train.lrr; did you mean `lr`? known keys here: ...".
    """
    close = difflib.get_close_matches(given, list(known), n=1)
    return f"did you mean `{close[0]}`? " if close else ""
