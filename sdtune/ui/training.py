"""The Train tab's work, without gradio: a DreamBooth run of the recipe in its own process.

``Trainer.start`` builds the run's config from the form (on top of ``configs/dreambooth_lora.yaml``), validates it
with ``sdtune.training.config`` (the CLI's checks and messages), refuses a folder another run holds (the recipe's
own ``output_lock``), writes ``RUN/ui_config.yaml`` and starts ``python -m sdtune train RUN/ui_config.yaml``. The
page reads the run's progress from its output (tqdm's ``N/M`` and ``loss=``) and the loss curve from its
TensorBoard events, the evaluation curves and the best step so far from its ``eval.jsonl`` (``eval_view``). Stop
sends SIGINT: the recipe finishes the step, saves ``checkpoint-N`` and exits; Resume
starts the same config again with ``resume=latest``. A crash is reported as the run's last error line.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from sdtune.errors import SdtuneError
from sdtune.imageio import save_image_atomic, write_text_atomic
from sdtune.ui.safety import Sandbox, check_upload
from sdtune.ui.train_form import BASE_CONFIG, BY_KEY

CONFIG_NAME = "ui_config.yaml"
LOG_NAME = "ui_train.log"
MAX_IMAGES = 20
# Config keys naming folders the run reads, and folders it writes: checked against the sandbox.
READ_KEYS = ("instance_dir", "model", "resume", "dataset")
WRITE_KEYS = ("class_dir", "latent_cache_dir")
FORM_KEYS = ("output_dir",)  # set by the form (the run name), not under "advanced"
RATE_FILE = "step_rate.json"  # OUTPUTS/ui/: the last run's measured step rate, for the next run's estimate
_STEP = re.compile(r"steps:\s*\d+%.*?\|\s*(\d+)/(\d+)")
_LOSS = re.compile(r"loss=([0-9.eE+-]+)")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,40}$")
# The selection rule's bounds (keys of TrainConfig): all that ``selection.Selection`` reads of a config.
BOUND_KEYS = ("max_drift", "max_bleed", "min_prompt_following", "learned_likeness", "stop_patience")
EVAL_COLUMNS = ("step", "value", "quantity")


def advanced_help() -> str:
    """Markdown for the Train tab's "advanced" box: every config key a line may set, grouped, with its default, type,
    range and help (``sdtune.training.config``'s declarations, as ``sdtune train --help-keys`` prints them)."""
    from sdtune.training.config import FIELDS, GROUPS
    from sdtune.training.keys_help import key_summary

    lines = ["One `key=value` per line (YAML values); the form's fields are keys too, and a line wins over them."]
    for group in GROUPS:
        lines += ["", f"**{group}**", ""]
        lines += [f"- `{key_summary(name)}`: {f.metadata['help'].replace('<', '&lt;')}" for name, f in FIELDS.items()
                  if f.metadata["group"] == group and name not in FORM_KEYS]
    return "\n".join(lines)


@dataclass
class Job:
    """One training process and what it said."""

    run_dir: Path
    process: subprocess.Popen
    resumed: bool = False
    started: float = field(default_factory=time.time)
    lines: deque = field(default_factory=lambda: deque(maxlen=400))
    step: int = 0
    total: int = 0
    loss: float | None = None
    stop_requested: bool = False
    ended: float | None = None
    first_step: tuple[float, int] | None = None  # (time, step) of the first step seen: the rate is measured from it
    last_step: tuple[float, int] | None = None
    reported: str = ""  # the state the page's status box last said (it follows the run without hiding an error)

    @property
    def rate(self) -> float | None:
        """Steps per second, measured over the steps seen (the first step, with the model load, not counted)."""
        if self.first_step is None or self.last_step is None or self.last_step[1] <= self.first_step[1]:
            return None
        return (self.last_step[1] - self.first_step[1]) / max(self.last_step[0] - self.first_step[0], 1e-6)

    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.step) / rate if rate and self.total else None

    @property
    def returncode(self):
        return self.process.poll()

    @property
    def state(self) -> str:
        rc = self.returncode
        if rc is None:
            return "stopping" if self.stop_requested else ("running" if self.total else "starting")
        if rc == 0:
            return "finished"
        if self.stop_requested or rc in (130, -signal.SIGINT):
            return "stopped"
        return "failed"

    def error_line(self) -> str | None:
        """The run's own one-line error, or the last line of a traceback."""
        for line in reversed(self.lines):
            if line.startswith("sdtune: error:"):
                return line
        tail = [ln for ln in self.lines if ln.strip()]
        return tail[-1] if tail else None

    def _read(self, log_path: Path) -> None:
        with open(log_path, "a", encoding="utf-8", errors="replace") as log:
            buf = ""
            for chunk in iter(lambda: self.process.stdout.read1(4096) if hasattr(self.process.stdout, "read1")
                              else self.process.stdout.read(4096), b""):
                log.write(chunk.decode("utf-8", "replace"))
                log.flush()
                buf += chunk.decode("utf-8", "replace")
                *parts, buf = re.split(r"[\r\n]", buf)
                for part in parts:
                    self._line(part)
            if buf:
                self._line(buf)
        self.ended = time.time()

    def _line(self, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        m = _STEP.search(line)
        if m:
            self.step, self.total = int(m.group(1)), int(m.group(2))
            now = time.time()
            if self.first_step is None or self.step < self.first_step[1]:
                self.first_step = (now, self.step)
            self.last_step = (now, self.step)
            loss = _LOSS.search(line)
            if loss:
                self.loss = float(loss.group(1))
            if self.lines and _STEP.search(self.lines[-1]):
                self.lines[-1] = line  # one line for the bar, as a terminal shows it
                return
        self.lines.append(line)


def losses(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, loss) from the run's TensorBoard events (the recipe flushes them every step)."""
    logs = Path(run_dir) / "logs"
    files = sorted(logs.rglob("events.out.tfevents.*")) if logs.is_dir() else []
    if not files:
        return []
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    points: dict[int, float] = {}
    for path in files:
        try:
            for event in EventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    if value.tag != "loss":
                        continue
                    v = value.simple_value if value.HasField("simple_value") else \
                        float(tensor_util.make_ndarray(value.tensor))
                    points[int(event.step)] = float(v)
        except Exception:  # a record being written right now: read the rest next time
            continue
    return sorted(points.items())


def selection_bounds(run_dir: str | os.PathLike) -> SimpleNamespace:
    """The bounds the run's selection rule uses: its ``ui_config.yaml``'s, else ``TrainConfig``'s defaults (a run
    started outside the UI with the defaults). The page then names the step the recipe itself keeps."""
    from sdtune.training.config import FIELDS
    from sdtune.yamlfile import read_yaml

    data: dict = {}
    try:
        data = read_yaml(Path(run_dir) / CONFIG_NAME) or {}
    except SdtuneError:
        pass  # no config of the UI's: the defaults
    bounds = {}
    for key in BOUND_KEYS:
        value, default = data.get(key, FIELDS[key].default), FIELDS[key].default
        try:  # a hand-edited config may hold anything; a wrong bound must not break the page's polling
            bounds[key] = None if value is None and default is None else type(default or 0.0)(value)
        except (TypeError, ValueError):
            bounds[key] = default
    return SimpleNamespace(**bounds)


def eval_history(run_dir: str | os.PathLike):
    """The run's evaluations so far (``eval.jsonl``, replaced whole at each evaluation, so never torn) and the best
    of them, by ``selection.Selection``'s own rule: eligible, highest likeness, earlier step on a tie, never step 0."""
    from sdtune.training.selection import Selection

    return Selection.resume(selection_bounds(run_dir), Path(run_dir), math.inf)


def eval_frame(history: list[dict]):
    """Long-form DataFrame (step, value, quantity) of likeness, prompt following, drift and bleed: one line per
    quantity in a ``gr.LinePlot`` with ``color="quantity"``. Quantities no scorer measured are left out."""
    import pandas as pd

    from sdtune.training.selection import QUANTITIES

    rows = [(r["step"], float(r[q]), q.replace("_", " ")) for r in history for q in QUANTITIES
            if isinstance(r.get("step"), int) and isinstance(r.get(q), (int, float)) and math.isfinite(r[q])]
    return pd.DataFrame(rows, columns=list(EVAL_COLUMNS)).astype({"step": int, "value": float, "quantity": str})


def best_line(selection) -> str:
    """One line naming the best step so far (and why), or why none is yet; empty before the first evaluation."""
    from sdtune.training.selection import why_not

    if not selection.history:
        return ""
    if selection.best is None:
        last = selection.history[-1]
        reason = why_not(last, selection.cfg) or ("only the base model (step 0) evaluated" if last.get("step") == 0
                                                  else "no likeness measured")
        return f"no best step yet: {reason}"
    return f"best so far: {selection.verdict()}"


def eval_view(run_dir: str | os.PathLike | None) -> tuple:
    """-> (curves DataFrame, best-step line) of a run folder; empty ones while it has no evaluation."""
    from sdtune.training.selection import EVAL_FILE

    if run_dir is None or not (Path(run_dir) / EVAL_FILE).is_file():
        return eval_frame([]), ""
    selection = eval_history(run_dir)
    return eval_frame(selection.history), best_line(selection)


class Trainer:
    """Starts, watches, stops and resumes training runs under the sandbox's outputs folder."""

    def __init__(self, sandbox: Sandbox, python: str = sys.executable):
        self.sandbox, self.python = sandbox, python
        self.jobs: dict[Path, Job] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the config

    def build_config(self, *, name: str, images=(), folder: str | None = None, identifier: str = "sks",
                     class_noun: str = "", model: str | None = None, advanced: str = "",
                     keys: dict | None = None) -> tuple[dict, Path]:
        """The run's config mapping (validated) and its folder. Nothing is written.

        ``keys`` are the form's key fields (``train_form.FIELDS``: method, max_steps, learning_rate, ...); a key left
        out keeps the recipe's value. A field's bad value is refused in its own words before anything else."""
        from sdtune.training.config import config_from_dict, parse_override
        from sdtune.ui.checks import train_problems
        from sdtune.yamlfile import read_yaml

        keys = dict(keys or {})
        problems = train_problems(keys)
        if problems:
            raise SdtuneError(next(iter(problems.values())))
        run_dir = self.sandbox.run_dir(name)
        identifier, class_noun = (identifier or "").strip(), (class_noun or "").strip()
        if not _WORD.match(identifier) or " " in identifier:
            raise SdtuneError(f"identifier {identifier!r}: one rare word such as sks (letters and digits)")
        if not _WORD.match(class_noun):
            raise SdtuneError(f"class noun {class_noun!r}: what the subject is, e.g. dog or box")
        images = [p for p in (images or []) if p]
        folder = (folder or "").strip()
        if images and folder:
            raise SdtuneError("upload images or name a folder, not both")
        if not images and not folder:
            raise SdtuneError("no training images: upload 3-5 images of the subject or name a folder")
        if len(images) > MAX_IMAGES:
            raise SdtuneError(f"{len(images)} images uploaded; DreamBooth needs 3-5 (at most {MAX_IMAGES})")
        for p in images:
            check_upload(p, "training image")
        data = read_yaml(BASE_CONFIG)
        recipe_photos = self.sandbox.resolve(data.get("instance_dir") or "data", "the recipe's photos")
        instance_dir = self.sandbox.resolve(folder, "image folder", kind="dir") if folder else run_dir / "instance"
        values = {key: BY_KEY[key].value(raw) for key, raw in keys.items()}
        steps = values.get("max_steps", data["max_steps"])
        data.update(
            model=str(self.sandbox.resolve(model, "model")) if model else None,
            instance_dir=str(instance_dir),
            instance_prompt=f"a photo of {identifier} {class_noun}", identifier=identifier,
            class_prompt=f"a photo of a {class_noun}",
            # the recipe's class prompts put the checker box's own caption contexts into the class images: they
            # fit its photos only; other photos get the class prompt alone
            class_prompts=data.get("class_prompts") if instance_dir == recipe_photos else None,
            class_dir=str(self.sandbox.outputs / "class_images" / re.sub(r"\W+", "_", class_noun)),
            output_dir=str(run_dir), validation_prompts=[f"a photo of {identifier} {class_noun}"],
            validation_every=max(1, steps // 2), checkpoint_every=max(1, min(250, steps // 2)), resume=None)
        data.update(values)
        if data.get("method") == "full":
            data.update(train_text_encoder=False)  # the recipe's text-encoder LoRA has no full-weights twin here
        for line in (advanced or "").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, value = parse_override(line)  # the CLI's parsing and messages
            if key in FORM_KEYS:
                raise SdtuneError(f"{key} is set by the run name; set the name instead")
            data[key] = value
        for key in READ_KEYS + WRITE_KEYS:
            value = data.get(key)
            if value in (None, "") or (key == "resume" and value == "latest") or \
                    (key == "instance_dir" and not folder and value == str(run_dir / "instance")):
                continue
            if key == "dataset" and not (Path(str(value)).is_absolute() or str(value).startswith(".")):
                continue  # a hub dataset id, read from the local cache
            data[key] = str(self.sandbox.resolve(value, key, kind="any", write=key in WRITE_KEYS))
        for c, concept in enumerate(data.get("concepts") or []):
            for key in ("instance_dir", "class_dir"):
                if isinstance(concept, dict) and concept.get(key):
                    concept[key] = str(self.sandbox.resolve(concept[key], f"concepts[{c}].{key}",
                                                            write=key == "class_dir"))
        config_from_dict(data)  # every key, type, choice and range, with the CLI's messages
        return data, run_dir

    # ------------------------------------------------------------ runs

    def start(self, *, resume: bool = False, images=(), **form) -> Job:
        """Validate, refuse a busy folder, write the config and start the recipe. Returns the job."""
        from sdtune.training.checkpointing import output_lock

        with self._lock:
            if resume:
                run_dir = self.sandbox.run_dir(form.get("name", ""))
                config = run_dir / CONFIG_NAME
                if not config.is_file():
                    raise SdtuneError(f"run {run_dir.name} has no {CONFIG_NAME}; start it first")
                data = None
            else:
                data, run_dir = self.build_config(images=images, **form)
                if (run_dir / CONFIG_NAME).is_file():
                    raise SdtuneError(f"run {run_dir.name} already exists in {self.sandbox.outputs}; choose another "
                                      "name, or press Resume to continue it")
            job = self.jobs.get(run_dir)
            if job is not None and job.returncode is None:
                raise SdtuneError(f"run {run_dir.name} is already training; wait for it or press Stop")
            new_folder = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                with output_lock(run_dir):  # refused here, in one line, if another process trains into it
                    pass
                if data is not None:
                    if images:
                        instance = Path(data["instance_dir"])
                        for i, p in enumerate(images):
                            save_image_atomic(check_upload(p, "training image").convert("RGB"),
                                              instance / f"{i:02d}.png")
                    import yaml

                    write_text_atomic(run_dir / CONFIG_NAME, yaml.safe_dump(data, sort_keys=False))
                cmd = [self.python, "-m", "sdtune", "train", str(run_dir / CONFIG_NAME)]
                if resume:
                    cmd.append("resume=latest")
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                try:
                    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=env,
                                               start_new_session=True)
                except OSError as exc:
                    raise SdtuneError(f"the training process could not start ({self.python}: {exc.strerror})") \
                        from None
            except BaseException:
                if new_folder and not resume:  # nothing half-written: a start that failed leaves no run behind
                    clean_failed_start(run_dir)
                raise
            job = Job(run_dir=run_dir, process=process, resumed=resume)
            job.lines.append(f"$ {' '.join(cmd)}")
            threading.Thread(target=self._watch, args=(job,), daemon=True).start()
            self.jobs[run_dir] = job
            return job

    def _watch(self, job: Job) -> None:
        """Read the run's output to its end, then keep its measured step rate for the next run's estimate."""
        job._read(job.run_dir / LOG_NAME)
        if job.rate:
            import json

            config = {}
            try:
                from sdtune.yamlfile import read_yaml

                config = read_yaml(job.run_dir / CONFIG_NAME) or {}
            except SdtuneError:
                pass
            record = {"steps_per_s": round(job.rate, 4), "run": job.run_dir.name,
                      **{k: config.get(k) for k in ("train_batch_size", "resolution", "lora_rank", "method",
                                                    "with_prior_preservation")}}
            try:
                write_text_atomic(self.sandbox.outputs / "ui" / RATE_FILE, json.dumps(record))
            except OSError:
                pass  # an estimate is a nicety; a full disk must not break the run's end

    def measured_rate(self) -> dict | None:
        """The last run's measured step rate and its settings (``OUTPUTS/ui/step_rate.json``), or None."""
        import json

        try:
            record = json.loads((self.sandbox.outputs / "ui" / RATE_FILE).read_text())
            return record if float(record.get("steps_per_s", 0)) > 0 else None
        except (OSError, ValueError, TypeError):
            return None

    def estimate(self, steps) -> str:
        """"about 5 min": the time ``steps`` take at the last run's measured rate, or what is needed for one."""
        record = self.measured_rate()
        try:
            steps = int(steps)
        except (TypeError, ValueError):
            return ""
        if record is None or steps < 1:
            return "time estimate: measured from the first run's step rate (none yet)"
        seconds = steps / float(record["steps_per_s"])
        settings = ", ".join(f"{k.replace('train_', '').replace('_', ' ')} {v}" for k, v in record.items()
                             if k not in ("steps_per_s", "run") and v is not None)
        return (f"estimated {duration(seconds)} for {steps} steps at {float(record['steps_per_s']):.2f} steps/s, "
                f"measured on run {record['run']} ({settings}); class images and model loading come on top")

    def stop(self, name: str) -> Job:
        """SIGINT to the run: it finishes the step, saves checkpoint-N and exits."""
        run_dir = self.sandbox.run_dir(name)
        job = self.jobs.get(run_dir)
        if job is None or job.returncode is not None:
            raise SdtuneError(f"run {run_dir.name} is not training")
        job.stop_requested = True
        job.process.send_signal(signal.SIGINT)
        return job

    def running(self) -> bool:
        return any(job.returncode is None for job in self.jobs.values())

    def job(self, name: str) -> Job | None:
        try:
            return self.jobs.get(self.sandbox.run_dir(name))
        except SdtuneError:
            return None

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop every running job (checkpointing) and wait for them."""
        for job in self.jobs.values():
            if job.returncode is None:
                job.stop_requested = True
                job.process.send_signal(signal.SIGINT)
        for job in self.jobs.values():
            try:
                job.process.wait(timeout)
            except subprocess.TimeoutExpired:
                job.process.kill()


def duration(seconds: float) -> str:
    """12 s, 3 min 20 s, 1 h 05 min: how long, in words a person reads at a glance."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def clean_failed_start(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but what the UI wrote before the recipe started."""
    from sdtune.training.checkpointing import LOCK_FILE

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {CONFIG_NAME, LOG_NAME, "instance", LOCK_FILE}:
        shutil.rmtree(run_dir)
