"""User-facing errors.

Every bad input a user can give raises ``SdtuneError`` with one line that says what is wrong and
how to fix it; the CLI prints it without a traceback and exits non-zero.
"""


class SdtuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise ``SdtuneError(message)`` unless ``condition`` holds."""
    if not condition:
        raise SdtuneError(message)
