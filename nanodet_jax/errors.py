"""Exceptions for mistakes in what the user gave us (a file, an override, a config).

The entry points (``cli.common.entry_point``) print these as one line on stderr and exit
with status 2; any other exception is a bug and keeps its traceback. Kept free of
imports so that the data, config and weight modules can all raise them.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the file or field and the problem.

    ``one_line`` is what an entry point prints when the full message has several lines
    (e.g. every offending key of a weight file); ``--debug`` shows the full message.
    """

    # A class default too: OSError.__init__ does not call ours (ImageReadError).
    one_line: str | None = None

    def __init__(self, message: str, one_line: str | None = None):
        super().__init__(message)
        self.one_line = one_line

    def brief(self) -> str:
        if self.one_line is not None:
            return self.one_line
        return str(self.args[0]) if self.args else type(self).__name__


class ConfigError(UserError, ValueError):
    """A config file or ``--config.*`` override that cannot be used as given."""


class UnknownFieldError(UserError, KeyError):
    """An override names a config field that does not exist (a KeyError, as before)."""
