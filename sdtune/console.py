"""What a command prints: sdtune's own lines and progress bars; third-party chatter only with --verbose.

By default (``setup(verbose=False)``):

* sdtune's log records print as one line each, ``sdtune: warning: ...`` / ``sdtune: note: ...``;
* sdtune's own Python warnings (``SdtuneWarning``) print the same way, without a source line;
* transformers/diffusers/accelerate log only errors, their loading bars are off, and Python warnings
  raised by libraries are not shown.

``setup(verbose=True)`` leaves the libraries as they come (their notices, bars and warnings) and logs
at INFO level, for finding out what a library is doing.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

LIBRARY_LOGGERS = ("transformers", "diffusers", "accelerate", "huggingface_hub", "datasets", "peft", "torch",
                   "PIL", "matplotlib", "urllib3", "filelock", "httpx")


class SdtuneWarning(UserWarning):
    """A warning sdtune gives the user about their input; shown as one ``sdtune: warning:`` line."""


def warn(message: str) -> None:
    """Warn the user (one line on the command line; a ``SdtuneWarning`` for code and tests)."""
    warnings.warn(message, SdtuneWarning, stacklevel=2)


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        kind = "warning" if record.levelno >= logging.WARNING else "note"
        return f"sdtune: {kind}: {record.getMessage()}"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (callers and tests may replace it after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; the property ignores it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """Above any progress bar, not into it (the training loop logs its evaluations while its bar runs)."""
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, SdtuneWarning):
        print(f"sdtune: warning: {message}", file=sys.stderr)
    elif _VERBOSE:
        _DEFAULT_SHOW(message, category, filename, lineno, file, line)


_DEFAULT_SHOW = warnings.showwarning
_VERBOSE = False


def setup(verbose: bool = False) -> None:
    """Route sdtune's messages to stderr as one-liners and quiet (or, verbose, keep) the libraries."""
    global _VERBOSE
    _VERBOSE = verbose
    log = logging.getLogger("sdtune")
    if not any(isinstance(h, _CurrentStderr) for h in log.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(_OneLine())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    warnings.showwarning = _show_warning
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        warnings.simplefilter("default")
        return
    # Read by transformers and huggingface_hub when they are imported (they may not be yet).
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DIFFUSERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    warnings.simplefilter("default", SdtuneWarning)
    # diffusers turns its loading bars on at import, whatever the environment: import and quiet both now
    # (every command that calls setup loads models with them anyway).
    import diffusers
    import huggingface_hub
    import transformers

    for module in (diffusers, transformers):
        module.utils.logging.set_verbosity_error()
        module.utils.logging.disable_progress_bar()
    # huggingface_hub sets its own level when imported: its retry notices ("Retrying in 8s") stay quiet too
    huggingface_hub.utils.logging.set_verbosity_error()
