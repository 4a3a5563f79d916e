"""Hard faults around training: one run per output folder, a full disk, a kill during a save."""
import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sdtune.errors import SdtuneError
from sdtune.generation.metadata import read_params
from sdtune.training import adapters, checkpointing

from test_train_recipe import config, make_images, recipe  # noqa: F401 (the recipe module, loaded once)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_a_second_run_into_a_folder_in_use_is_refused(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with checkpointing.output_lock(out):
        with pytest.raises(SdtuneError, match=r"output_dir .* is in use by another training run \(pid \d+\)"):
            recipe.train(config(tiny_models, make_images(tmp_path / "imgs", 2), out, max_steps=1))
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_a_killed_run_does_not_leave_the_folder_locked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); from sdtune.training import checkpointing\n"
        "with checkpointing.output_lock(%r):\n    print('locked', flush=True); time.sleep(60)") %
        (str(checkpointing.Path(checkpointing.__file__).parents[2]), str(out))], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(SdtuneError, match="in use"):
        with checkpointing.output_lock(out):
            pass
    os.kill(holder.pid, signal.SIGKILL)  # a crash: no cleanup code runs
    holder.wait()
    with checkpointing.output_lock(out):  # the kernel released it with the process
        pass


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tiny_models, tmp_path, monkeypatch):
    images = make_images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    recipe.train(config(tiny_models, images, out, max_steps=2, checkpoint_every=1, checkpoints_keep=5))
    good = sorted(p.name for p in out.glob("checkpoint-*"))
    assert good == ["checkpoint-1"]  # the last step saves the final weights, not a checkpoint
    import accelerate

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    with pytest.raises(SdtuneError) as err:
        recipe.train(config(tiny_models, images, out, max_steps=4, checkpoint_every=1, checkpoints_keep=5,
                            resume="latest"))
    message = str(err.value)
    assert message.startswith("no space left on the device while writing checkpoint-2")
    assert "the last complete checkpoint (checkpoint-1) is intact" in message and "\n" not in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == good and not list(out.glob(".checkpoint-*"))
    assert checkpointing.resolve_resume("latest", out).name == "checkpoint-1"


# ------------------------------------------------------------------ real small and read-only file systems

@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a tmpfs of a given size (and read-only if asked) at a fresh folder; unmounted after the test.
    Needs root (CI runs as root); skipped where mounting is not allowed."""
    mounted = []

    def mount(name: str, size_kb: int, read_only: bool = False, fill_from=None):
        point = tmp_path / name
        point.mkdir()
        opts = f"size={size_kb}k"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'})")
        mounted.append(point)
        if fill_from is not None:
            subprocess.run(["cp", "-a", f"{fill_from}/.", str(point)], check=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def sdtune_cli(*argv, cwd=None):
    if argv[0] == "train":  # `sdtune train CONFIG key=value ...`: an empty config, every key given as an override
        empty = Path(tempfile.mkdtemp()) / "empty.yaml"
        empty.write_text("{}\n")
        argv = ("train", empty, *argv[1:])
    return subprocess.run([sys.executable, "-m", "sdtune", *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, cwd=cwd, timeout=300)


def test_a_read_only_output_folder_is_refused_before_any_work(tiny_models, tmp_path, mount_tmpfs):
    images = make_images(tmp_path / "imgs", 2)
    ro = mount_tmpfs("ro", 256, read_only=True)
    proc = sdtune_cli("train", f"model={tiny_models['sd1']}", f"instance_dir={images}",
                      "instance_prompt=a photo of sks dog", "resolution=32", "max_steps=1", f"output_dir={ro}/run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdtune: error: output_dir {ro}/run is not writable"), lines
    assert "Read-only file system" in lines[0]
    assert "steps" not in proc.stderr  # refused before the model was loaded or a step was taken


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tiny_models, tmp_path, mount_tmpfs):
    """A real full file system (tmpfs sized to what one checkpoint leaves room for): one line, checkpoint-1 intact
    and resumable once there is room again."""
    images = make_images(tmp_path / "imgs", 2)
    first = tmp_path / "first"
    common = [f"model={tiny_models['sd1']}", f"instance_dir={images}", "instance_prompt=a photo of sks dog",
              "resolution=32", "checkpoint_every=1", "checkpoints_keep=5", "caption_dropout=0", "seed=0"]
    proc = sdtune_cli("train", *common, "max_steps=2", f"output_dir={first}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for final in (first / adapters.LORA_FILE, first / adapters.KOHYA_FILE, first / "README.md"):
        final.unlink()  # a run that stopped after checkpoint-1 ...
    used_kb = int(subprocess.run(["du", "-sk", str(first)], capture_output=True, text=True).stdout.split()[0])
    checkpoint_kb = int(subprocess.run(["du", "-sk", str(first / "checkpoint-1")], capture_output=True,
                                       text=True).stdout.split()[0])
    # ... on a disk with room for half a checkpoint more
    small = mount_tmpfs("small", used_kb + checkpoint_kb // 2, fill_from=first)
    proc = sdtune_cli("train", *common, "max_steps=4", "resume=latest", f"output_dir={small}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sdtune: error:")]
    assert len(lines) == 1 and "no space left on the device while writing checkpoint-2" in lines[0], proc.stderr[-2000:]
    assert "the last complete checkpoint (checkpoint-1) is intact" in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in small.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not list(small.glob(".checkpoint-*")) and not (small / adapters.LORA_FILE).exists()
    assert checkpointing.resolve_resume("latest", small).name == "checkpoint-1"


def test_a_full_disk_while_writing_images_is_one_line(tiny_models, tmp_path, mount_tmpfs):
    tiny = mount_tmpfs("tiny", 8)
    (tiny / "filler").write_bytes(b"\0" * (8 * 1024 - 512))  # leaves less than one PNG's worth
    proc = sdtune_cli("infer", "txt2img", "--model", tiny_models["sd1"], "--prompt", "a boat", "--steps", "1",
                      "--num-images", "2", "--out", tiny / "images")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("sdtune: error:")]
    assert len(errors) == 1 and errors[0].startswith("sdtune: error: no space left on the device while writing ")
    assert not list((tiny / "images").glob(".*.partial"))  # the temporary file went with the failed write
    for png in (tiny / "images").glob("*.png"):  # what is under a final name is whole
        assert read_params(png)["prompt"] == "a boat"
