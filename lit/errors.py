"""The one exception type for mistakes a user can fix.

A :class:`UserError` (missing file, wrong option, unknown name, a folder the
suite will not overwrite) ends a ``lit`` command with one line,
``error: <message>``, printed last, and exit status 2; the traceback is shown
only with ``--debug`` or ``LIT_DEBUG=1`` (see :mod:`lit.cli`). Raise it with a
message that names the file or option and says what would be right.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; ``lit`` prints ``error: <message>`` and exits with status 2."""
