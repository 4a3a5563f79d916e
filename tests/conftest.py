"""Shared test fixtures: tiny random models built once per test session, offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# `datasets` caches what it reads (imagefolder metadata); tests keep that out of the user's home, and remove it.
if "HF_DATASETS_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="sdtune-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from sdtune import DATA_DIR as DATA  # noqa: E402

# SDTUNE_TEST_THREADS=1 leaves the other core to a job running beside the tests.
torch.set_num_threads(int(os.environ.get("SDTUNE_TEST_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of tiny diffusers folders: {'sd1', 'sd2v', 'inpaint', 'depth'}."""
    from sdtune.models.fixtures import tiny_family

    return tiny_family(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: small models gain nothing from a second, and on shared CPUs two
    threads per process spin against each other (measured: 2-3x slower steps under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Paths of tiny SDXL folders: {'sdxl', 'sdxl_inpaint', 'sdxl_refiner', 'sdxl_controlnet', 'sd1_controlnet',
    'depth_estimator'} (the SD 1.x ControlNet fits ``tiny_models['sd1']``)."""
    from sdtune.models.fixtures import tiny_sdxl_family

    return tiny_sdxl_family(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """Paths of the tiny SD 3.5 models: {'sd3' (a diffusers folder with T5), 'sd3_controlnet', 'depth_estimator'}."""
    from sdtune.models.fixtures import tiny_sd3_family

    return tiny_sd3_family(tmp_path_factory.mktemp("tiny_sd3"))


def _write_inputs(folder, seed: int = 0, size: int = 32) -> dict:
    """A noise image, a mask (white square in the middle = repaint) and a left-to-right depth ramp, as PNG files in
    ``folder``; returns {stem: path} of every file there (a test may add its own files first)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(folder / "image.png")
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    mask.save(folder / "mask.png")
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.float32), (size, 1))
    Image.fromarray(ramp.astype("uint8")).save(folder / "depth_lr.png")
    return {p.stem: str(p) for p in folder.iterdir()}


@pytest.fixture(scope="session")
def write_inputs():
    """``write_inputs(folder, seed=0)``: the generation tests' input files (image, mask, depth ramp)."""
    return _write_inputs


# Tiny random CLIP and DINO models (local folders), for the paper's metrics and the in-loop evaluation.
@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(cfg).save_pretrained(folder)
    CLIPTokenizer(str(DATA / "clip_tokenizer/vocab.json"), str(DATA / "clip_tokenizer/merges.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    folder = tmp_path_factory.mktemp("tiny_dino")
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder
