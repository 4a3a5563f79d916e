"""User-facing errors.

Every bad input a user can give raises ``SdtuneError`` with one line that says what is wrong and
how to fix it; the CLI prints it without a traceback and exits non-zero.
"""
import errno
import os
import string
from typing import Callable

# Errors that mean "the disk cannot take this write" rather than a bug: said in one line wherever sdtune writes.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class SdtuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class LaunchError(SdtuneError):
    """A problem with how a multi-process run was launched: every process finds the same one, so only the main
    process says it (two processes writing one line to one stderr interleave it)."""


class ParameterError(SdtuneError):
    """A refused parameter, in one line naming it as Python callers spell it (``lora_scale must be ...``).

    ``template`` marks each parameter it names as ``{name}`` and every other value as a field given in ``values``
    (so a value is never read as a parameter). ``params`` lists the parameters named; ``worded(word)`` is the
    message with each one worded by ``word`` - the command line passes its flags (``--lora-scale``).
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        fields = (name for _, name, _, _ in string.Formatter().parse(template) if name)
        self.params = tuple(dict.fromkeys(name for name in fields if name not in values))
        super().__init__(self.worded())

    def worded(self, word: Callable[[str], str] = str) -> str:
        return self.template.format(**{p: word(p) for p in self.params}, **self.values)


def require(condition: bool, message: str) -> None:
    """Raise ``SdtuneError(message)`` unless ``condition`` holds."""
    if not condition:
        raise SdtuneError(message)


def disk_reason(exc: BaseException, path=None) -> str | None:
    """What a failed write says about the disk ("no space left on the device", "the file system is read-only"),
    or None when the error is something else.

    Python's own writes raise ``OSError`` with an errno; safetensors (Rust) and torch.save (C++) raise their own
    types carrying only the OS's text, so that text is read too; torch.save's zip writer may say only "unexpected
    pos", so with ``path`` (where the write went) a file system left with under 1 MiB free counts as full.
    """
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return "the file system is read-only" if exc.errno == errno.EROFS else "no space left on the device"
    text = str(exc)
    if "Read-only file system" in text or "os error 30" in text:
        return "the file system is read-only"
    if any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122",
                               "File too large", "os error 27")):
        return "no space left on the device"
    if path is not None and _free_bytes(path) < 2**20:
        return "no space left on the device"
    return None


def _free_bytes(path) -> int:
    for candidate in (path, os.path.dirname(os.fspath(path))):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return 2**62
