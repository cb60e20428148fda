"""The one exception type for mistakes a user can fix.

A :class:`UserError` (missing file, wrong option, unknown name, a folder the
suite will not overwrite) ends a ``lit`` command with one line,
``error: <message>``, printed last, and exit status 2; the traceback is shown
only with ``--debug`` or ``LIT_DEBUG=1`` (see :mod:`lit.commands.cli`). Raise it with a
message that names the file or option and says what would be right.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class UserError(Exception):
    """A mistake the user can fix; ``lit`` prints ``error: <message>`` and exits with status 2."""


class UserArgumentParser(argparse.ArgumentParser):
    """``argparse`` parser for ``lit`` commands: a command-line mistake raises :class:`UserError`
    (printed by ``lit`` as one line, ``error: <prog>: <message>``) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")
