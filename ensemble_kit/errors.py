"""The one exception type for errors a user can cause."""


class EkError(Exception):
    """A user-facing error: bad config, missing record, corrupt file, mismatched OOF.

    The CLI prints ``str(error)`` as one line and exits with code 2.
    """

    exit_code = 2
