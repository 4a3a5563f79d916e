"""What a user installing sdtune gets: a wheel that carries what the commands need and works from any folder."""
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_lists_every_package_of_the_tree():
    """setuptools is given the package list (configs/ and data/ ride inside as sdtune._configs / sdtune._data),
    so a new subpackage must be added there, or the wheel would lack it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sdtune").rglob("__init__.py")}
    assert listed == tree | {"sdtune._configs", "sdtune._data"}


def test_nothing_in_the_library_loads_code_from_a_file_path():
    pattern = re.compile(r"spec_from_file_location|SourceFileLoader|run_path|exec\(open|load_source\(")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "sdtune").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def _fresh_venv_with_wheel(tmp: Path) -> Path:
    """A new virtual environment holding sdtune from a wheel built here; its dependencies are this environment's
    (a .pth file adds them: nothing is downloaded), so only the wheel provides sdtune."""
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("sdtune-*.whl")
    assert wheel.stat().st_size < 60 * 2**20, f"the wheel is {wheel.stat().st_size / 2**20:.1f} MB"
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "_sdtune_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return venv


@pytest.mark.slow
def test_an_installed_wheel_works_from_an_empty_folder(tmp_path):
    venv = _fresh_venv_with_wheel(tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ACCELERATE_USE_CPU")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")

    def sdtune(*args, timeout=900):
        proc = subprocess.run(["sdtune", *map(str, args)], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, (args, proc.stdout[-1500:], proc.stderr[-3000:])
        return proc

    where = subprocess.run(["python", "-c", "import sdtune; print(sdtune.__file__); print(sdtune.DATA_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, with its own data
    assert sdtune("--version").stdout.strip().startswith("sdtune ")

    # the main job, short
    sdtune("demo", "--quick", "--out", "demo")
    assert (work / "demo" / "metrics.json").is_file()

    # all four modes on the embedded family, with the LoRA the demo trained
    sdtune("infer", "txt2img", "--prompt", "a photo of a box on grass", "--steps", "4", "--out", "t2i")
    (image,) = (work / "t2i").glob("*.png")
    sdtune("infer", "img2img", "--image", image, "--prompt", "a photo of sks box on sand", "--lora", "demo/lora",
           "--steps", "4", "--out", "i2i")
    from PIL import Image

    mask = work / "mask.png"
    Image.new("L", Image.open(image).size, 0).point(lambda _: 255).save(mask)
    sdtune("infer", "inpaint", "--image", image, "--mask", mask, "--prompt", "a red ball", "--steps", "4",
           "--out", "inp")
    sdtune("infer", "depth2img", "--image", image, "--prompt", "a photo of a box at night", "--steps", "4",
           "--out", "d2i")
    for folder in ("i2i", "inp", "d2i"):
        assert list((work / folder).glob("*.png")), folder

    # training: a config file of the user's own, then key=value settings only
    photos = work / "photos"
    photos.mkdir()
    for i in range(3):
        Image.open(image).rotate(90 * i).save(photos / f"{i}.png")
    (work / "my.yaml").write_text(textwrap.dedent("""\
        instance_dir: photos
        instance_prompt: a photo of sks box
        with_prior_preservation: false
        max_steps: 2
        output_dir: mine
        """))
    sdtune("train", "my.yaml")
    assert (work / "mine" / "pytorch_lora_weights.safetensors").is_file()
    sdtune("train", "instance_dir=photos", "instance_prompt=a photo of sks box", "class_prompt=a photo of a box",
           "num_class_images=2", "max_steps=2", "validation_prompts=[]")
    assert (work / "outputs" / "photos-lora" / "pytorch_lora_weights.safetensors").is_file()

    # accelerate launch -m on two CPU processes (gloo)
    launch = subprocess.run(
        ["python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdtune.training.dreambooth", "my.yaml",
         "output_dir=launched"], cwd=work, env={**env, "ACCELERATE_USE_CPU": "true"}, capture_output=True,
        text=True, timeout=900)
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert (work / "launched" / "pytorch_lora_weights.safetensors").is_file()

    # the web UI answers on its port
    pytest.importorskip("gradio")
    port = _free_port()
    ui = subprocess.Popen(["sdtune", "ui", "--port", str(port)], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.time() + 180, None
        while time.time() < deadline and status is None and ui.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status
            except OSError:
                time.sleep(1)
        assert status == 200, ui.stdout.read() if ui.poll() is not None else "no answer"
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
