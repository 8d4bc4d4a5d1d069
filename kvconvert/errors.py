"""One exception type for every failure a user can fix (bad input, missing files, offline Hub).

The CLI prints its message as a one-line error and exits non-zero; the Python API raises it.
"""


class KVConvertError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""


class KeptProgress(KeyboardInterrupt):
    """An interrupt (Ctrl-C) after which a run kept its progress for ``--resume``; the message
    says where. The CLI prints it instead of "no output was written"."""
