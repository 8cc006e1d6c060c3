"""The one family of errors a user can cause and fix: a bad config key, input file, cache, weights
folder or server answer. `relvid` prints them as one line (exit code 2); any other exception is a
programming error and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave (a file, a key, a folder, a server) is not usable as it is. The
    message says what was wrong, where (file, key) and what to do."""


class OutputExistsError(UserError, FileExistsError):
    """An output would replace what a user made (a run, a cache, an exported file): refused unless
    the command is given --overwrite."""


class InputError(UserError, ValueError):
    """A value, file or folder the user gave cannot be used as it is."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or holds nothing usable)."""
