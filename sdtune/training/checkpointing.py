"""Training checkpoints: ``output_dir/checkpoint-N`` written so a crash never destroys the last good one.

Each checkpoint is accelerate's full training state (models, optimizer, lr schedule, RNG states;
``accelerator.save_state``) plus ``sdtune_state.json`` with the step. It is written into a hidden
``.checkpoint-N.partial`` folder and renamed only when complete, so a kill mid-save leaves a
partial folder that nothing ever reads (it is removed on the next start) and the previous checkpoint
intact. Only then are checkpoints beyond ``checkpoints_keep`` pruned, oldest first.

The data order and every random draw of the recipe are functions of (seed, step), so the step is all
a resumed run needs to continue exactly where the interrupted one was.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from sdtune.errors import SdtuneError, disk_reason

NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "sdtune_state.json"
LOCK_FILE = ".sdtune-train.lock"


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike, enabled: bool = True):
    """One training run per output folder: an exclusive ``flock`` on OUTPUT_DIR/.sdtune-train.lock.

    The kernel drops the lock when its process ends, however it ends, so a crashed or killed run never leaves
    the folder stuck; a second run into a folder in use is refused at once. (Only the main process takes it.)
    """
    if not enabled:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not on this platform (Windows): no lock, as before
        yield
        return
    path = Path(output_dir) / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SdtuneError(f"output_dir {output_dir} is in use by another training run ({holder}); wait for it to "
                              "finish or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def disk_error(exc: BaseException, what: str, output_dir) -> SdtuneError | None:
    """A one-line error for a full or read-only disk while writing ``what``; None for other errors."""
    reason = disk_reason(exc, output_dir)
    if reason is None:
        return None
    last = latest_checkpoint(output_dir)
    kept = f"the last complete checkpoint ({last.name}) is intact" if last else "no earlier checkpoint exists"
    return SdtuneError(f"{reason} while writing {what} in {output_dir}; {kept}. Free space (or make it writable) and "
                       "run again with resume=latest")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was taken after."""
    state = Path(path) / STATE_FILE
    if not state.is_file():
        raise SdtuneError(f"{path} is not an sdtune checkpoint (no {STATE_FILE}); pass a checkpoint-N folder "
                          "or resume=latest")
    return int(json.loads(state.read_text())["global_step"])


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``resume`` (a folder or "latest") -> the checkpoint to load, or None to start fresh."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)  # none yet: a fresh start, so "latest" is safe to always pass
    path = Path(resume).expanduser()
    checkpoint_step(path)  # validates
    return path


def remove_partials(output_dir: str | os.PathLike) -> None:
    """Delete leftovers of saves that were interrupted (main process only)."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".checkpoint-*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def prune(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints; return what was removed."""
    removed = []
    for _, path in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Save the full training state as ``checkpoint-<step>``; every process must call this."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    partial = root / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)  # before any rank writes into it (under FSDP every rank writes its own shard and state)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))  # each rank writes its own RNG state; main writes the rest
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / STATE_FILE).write_text(json.dumps({"global_step": step}) + "\n")
    except Exception as exc:  # not only OSError: safetensors and torch.save raise their own types for a full disk
        shutil.rmtree(partial, ignore_errors=True)  # never half a checkpoint
        error = disk_error(exc, f"checkpoint-{step}", root)
        if error is None:
            raise
        raise error from None
    if accelerator.is_main_process:
        if final.exists():  # e.g. a resumed run passing the same step again: swap, never merge
            stale = root / f".checkpoint-{step}.old.partial"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(partial, final)
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final
