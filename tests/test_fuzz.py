"""Fuzzed inputs: seeded random and mutated bytes where users hand sdtune files.

Images, masks and depth maps (generation inputs), LoRA files, YAML training configs and the PNG metadata
that ``--from-png`` reads. Each case must end in one of two ways: a correct result (an image of the asked
size, a validated config, a loaded LoRA) or one ``SdtuneError`` whose message is a single line. Anything
else - another exception type, a traceback, a multi-line message - fails the test and names the case's
seed, so it can be replayed. Every case goes through the same function the command line calls.
"""
import io
import json
import math
import random
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image, PngImagePlugin

from sdtune.errors import SdtuneError

SEED = 20261201


# ------------------------------------------------------------------------------------- mutators

def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three seeded edits of the kinds a broken download, disk or tool makes."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("flip", "byte", "truncate", "insert", "delete", "repeat", "zero"))
        if not b:
            b = bytearray(rng.randbytes(rng.randint(1, 64)))
        i = rng.randrange(len(b))
        if op == "flip":
            b[i] ^= 1 << rng.randrange(8)
        elif op == "byte":
            b[i] = rng.randrange(256)
        elif op == "truncate":
            del b[i:]
        elif op == "insert":
            b[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op == "delete":
            del b[i:i + rng.randint(1, 32)]
        elif op == "repeat":
            j = min(len(b), i + rng.randint(1, 64))
            b[i:i] = b[i:j] * rng.randint(1, 4)
        else:
            j = min(len(b), i + rng.randint(1, 64))
            b[i:j] = bytes(j - i)
    return bytes(b)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def odd_image(rng: random.Random) -> Image.Image:
    """A valid image of an unusual shape or mode: 1 px wide, huge aspect, palette, 16-bit, alpha, flat."""
    w, h = rng.choice([(1, 1), (1, 40), (40, 1), (3, 5), (7, 9), (64, 64), (33, 17), (200, 8), (16, 16)])
    mode = rng.choice(("RGB", "L", "RGBA", "P", "I;16", "LA", "1", "F", "CMYK"))
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if rng.random() < 0.3:
        arr[:] = rng.randrange(256)  # flat: a depth map without relief, an all-black or all-white mask
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        return Image.fromarray(arr[..., 0].astype(np.uint16) * 257)  # 16-bit greyscale
    if mode == "F":
        return Image.fromarray(arr[..., 0].astype(np.float32) / 255.0)  # 32-bit float
    return img.convert(mode)


def image_bytes(rng: random.Random, seed_img: Image.Image) -> tuple[bytes, str]:
    """Random bytes, a mutated PNG/JPEG/WebP/BMP/GIF of a real image, or an odd but valid image."""
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randint(0, 2048)), ".png"
    if kind < 0.35:
        img = odd_image(rng)
        fmt = "TIFF" if img.mode in ("F", "I;16", "CMYK") else rng.choice(("PNG", "TIFF"))
        return encoded(img, fmt), ".png" if fmt == "PNG" else ".tif"
    fmt = rng.choice(("PNG", "JPEG", "WEBP", "BMP", "GIF"))
    src = seed_img.convert("RGB") if fmt in ("JPEG", "BMP") else seed_img
    return mutate(encoded(src, fmt), rng), "." + fmt.lower()


def one_line_error(exc: SdtuneError, case: str) -> None:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, f"{case}: not one line: {text!r}"


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def engine(tiny_models):
    import torch

    from sdtune.generation.engine import Engine

    torch.set_num_threads(1)
    return Engine.load(tiny_models["sd1"], inpaint_model=tiny_models["inpaint"], depth_model=tiny_models["depth"])


@pytest.fixture(scope="module")
def world_image():
    from sdtune.world.scenes import Scene, render

    return render(Scene(kind="ball", colour="red", size="large", position="left", background="grass")).image


# ------------------------------------------------------------------------------------- cases

def test_fuzzed_generation_inputs(engine, world_image, tmp_path):
    """Images (img2img), masks (inpaint) and depth maps (depth2img): 600 cases."""
    from sdtune.generation.engine import check_request

    rng = random.Random(SEED)
    good_mask = Image.new("L", world_image.size, 0)
    good_mask.paste(255, (16, 16, 48, 48))
    base_image = tmp_path / "image.png"
    world_image.save(base_image)
    mask_path = tmp_path / "mask.png"
    good_mask.save(mask_path)
    outcomes = {"error": 0, "image": 0}
    for case in range(600):
        mode = ("img2img", "inpaint", "depth2img")[case % 3]
        seed_img = good_mask if mode == "inpaint" else world_image
        data, suffix = image_bytes(rng, seed_img)
        path = tmp_path / f"case{case}{suffix}"
        path.write_bytes(data)
        request = dict(steps=2, guidance=7.5, seed=case, width=None, height=None, scheduler=None,
                       strength=1.0 if mode == "inpaint" else 0.5, num_images=1,
                       image=str(path) if mode == "img2img" else str(base_image),
                       mask=str(path) if mode == "inpaint" else (str(mask_path) if mode == "inpaint" else None),
                       depth_map=str(path) if mode == "depth2img" else None)
        label = f"case {case} ({mode}, seed {SEED})"
        try:
            check_request(mode, **request)  # what the CLI runs before loading a model
            results = engine.generate(mode, prompt="a photo of a ball", **request)
        except SdtuneError as exc:
            one_line_error(exc, label)
            outcomes["error"] += 1
            continue
        (result,) = results
        assert result.image.mode == "RGB" and min(result.image.size) >= 8 and result.image.size[0] % 8 == 0, label
        outcomes["image"] += 1
    # Both endings occur: the fuzzer reaches the decoder's errors and the generation behind them.
    assert outcomes["error"] > 100 and outcomes["image"] > 50, outcomes


def _lora_bytes(tiny_models, tmp_path) -> bytes:
    """A real LoRA file for the tiny SD1 model, saved by diffusers (UNet + text encoder)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights="gaussian"))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Edit the JSON header (dtype, shape, offsets, names) or the bytes of a safetensors file."""
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    choice = rng.random()
    if choice < 0.5:
        return mutate(data, rng)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    edit = rng.choice(("dtype", "shape", "offsets", "rename", "drop", "metadata"))
    if edit == "dtype":
        entry["dtype"] = rng.choice(("F16", "BF16", "I8", "BOOL", "F64", "X9"))
    elif edit == "shape":
        entry["shape"] = [rng.choice((0, 1, 3, 7, 10**6)) for _ in range(rng.randint(0, 4))]
    elif edit == "offsets":
        entry["data_offsets"] = sorted(rng.randrange(len(body) + 64) for _ in range(2))
    elif edit == "rename":
        header[rng.choice(("unet.x.lora_A.weight", "text_encoder.y.lora.up.weight", "lora_unet_z.alpha",
                           "no_lora_here"))] = header.pop(name)
    elif edit == "drop":
        header.pop(name)
    else:
        header["__metadata__"] = {"format": rng.choice(("pt", "np", "")), "lora_adapter_metadata": "{not json"}
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def test_fuzzed_lora_files(engine, tiny_models, tmp_path):
    """200 LoRA files: mutated bytes and edited safetensors headers, read and fitted as `--lora` does."""
    from sdtune.models import lora as lora_mod

    real = _lora_bytes(tiny_models, tmp_path / "real")
    rng = random.Random(SEED + 1)
    outcomes = {"error": 0, "loaded": 0}
    for case in range(200):
        path = tmp_path / f"lora{case}.safetensors"
        path.write_bytes(mutate_safetensors(real, rng) if case % 4 else rng.randbytes(rng.randint(0, 512)))
        label = f"lora case {case} (seed {SEED + 1})"
        try:
            lf = lora_mod.read_lora(path)
            lora_mod.check_fits(lf, unet=engine.unets["base"])
            lora_mod.check_fits(lf, text_encoder=engine.text_encoder)
        except SdtuneError as exc:
            one_line_error(exc, label)
            outcomes["error"] += 1
            continue
        assert lf.unet_keys + lf.text_encoder_keys > 0, label
        outcomes["loaded"] += 1
    assert outcomes["error"] > 100 and outcomes["loaded"] > 0, outcomes


def test_fuzzed_lora_through_the_engine(tiny_models, tmp_path):
    """The fuzzed LoRAs that read and fit are then loaded and fused by Engine.load, as `sdtune infer --lora`."""
    import torch

    from sdtune.generation.engine import Engine
    from sdtune.models import lora as lora_mod

    torch.set_num_threads(1)
    real = _lora_bytes(tiny_models, tmp_path / "real")
    rng = random.Random(SEED + 2)
    loaded = 0
    for case in range(60):
        path = tmp_path / f"lora{case}.safetensors"
        path.write_bytes(mutate_safetensors(real, rng))
        try:
            lora_mod.read_lora(path)
        except SdtuneError:
            continue  # covered above; only what reads is worth a model load here
        label = f"engine lora case {case} (seed {SEED + 2})"
        try:
            engine = Engine.load(tiny_models["sd1"], lora=str(path))
            (result,) = engine.generate("txt2img", prompt="a boat", steps=1, seed=0, width=32, height=32)
        except SdtuneError as exc:
            one_line_error(exc, label)
            continue
        assert np.isfinite(np.asarray(result.image, dtype=float)).all(), label
        loaded += 1
    assert loaded > 0


YAML_BASE = {
    "instance_dir": "INSTANCE", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
    "with_prior_preservation": True, "class_dir": "CLASS", "num_class_images": 4, "method": "lora", "lora_rank": 4,
    "resolution": 32, "max_steps": 10, "learning_rate": 1e-4, "caption_dropout": 0.1, "output_dir": "OUT",
    "buckets": None, "concepts": None,
}
ODD_VALUES = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), "", "x", "latest", [], [1, 2], {},
              {"a": 1}, 10**30, "1e-4", "auto", [[64, 32]], [[0, 0]], [{"instance_dir": "x"}]]


def fuzzed_yaml(rng: random.Random) -> str:
    cfg = dict(YAML_BASE)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(cfg) + ["unknown_key", "lora_rnak", "concepts", "buckets"])
        if rng.random() < 0.2:
            cfg.pop(key, None)
        else:
            cfg[key] = rng.choice(ODD_VALUES)
    text = yaml.safe_dump(cfg, allow_unicode=True)
    if rng.random() < 0.4:  # break the YAML itself, not only its values
        text = mutate(text.encode(), rng).decode("utf-8", errors=rng.choice(("replace", "ignore", "surrogateescape")))
    return text


def test_fuzzed_yaml_configs(tmp_path):
    """300 training configs: wrong types and values, unknown keys, broken YAML, invalid UTF-8 - loaded and
    validated as `sdtune train CONFIG` does before any work."""
    from sdtune.training.config import load_config

    rng = random.Random(SEED + 3)
    outcomes = {"error": 0, "valid": 0}
    for case in range(300):
        path = tmp_path / f"cfg{case}.yaml"
        text = fuzzed_yaml(rng)
        try:
            path.write_text(text, encoding="utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            path.write_bytes(text.encode("utf-8", errors="replace"))
        if case % 10 == 0:
            path.write_bytes(rng.randbytes(rng.randint(0, 300)))
        label = f"yaml case {case} (seed {SEED + 3})"
        try:
            cfg = load_config(path, [])
        except SdtuneError as exc:
            one_line_error(exc, label)
            outcomes["error"] += 1
            continue
        assert isinstance(cfg.max_steps, int) and cfg.max_steps >= 1, label
        assert math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0, label
        outcomes["valid"] += 1
    assert outcomes["error"] > 100 and outcomes["valid"] > 10, outcomes


def png_with_params(img: Image.Image, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("sdtune", text)
    return encoded_with(img, info)


def encoded_with(img, info) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def mutate_params(params: dict, rng: random.Random) -> str:
    p = dict(params)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(p) + ["mode", "steps", "seed", "width", "scheduler", "image", "mask", "lora_scale"])
        r = rng.random()
        if r < 0.2:
            p.pop(key, None)
        elif r < 0.9:
            p[key] = rng.choice(ODD_VALUES + ["inpaint", "img2img", "depth2img", "txt2img", "/nonexistent.png",
                                              "../../etc/passwd", 2**70, -5, "euler", "pndm"])
        else:
            return mutate(json.dumps(p).encode(), rng).decode("utf-8", errors="replace")
    try:
        return json.dumps(p)
    except ValueError:
        return json.dumps(p, allow_nan=True)


def test_fuzzed_png_metadata_for_from_png(engine, tmp_path):
    """200 PNGs carrying mutated sdtune parameters (and mutated PNG bytes): read, checked and regenerated as
    `sdtune infer --from-png` does; what is accepted regenerates an image."""
    from sdtune.generation.engine import check_params, regenerate
    from sdtune.generation.metadata import read_params, save_results

    (made,) = engine.generate("txt2img", prompt="a red ball", steps=2, seed=5, width=32, height=32)
    (real_png,) = save_results([made], tmp_path / "real")
    real = read_params(real_png)
    rng = random.Random(SEED + 4)
    outcomes = {"error": 0, "image": 0}
    for case in range(200):
        path = tmp_path / f"meta{case}.png"
        if case % 5 == 0:
            path.write_bytes(mutate(real_png.read_bytes(), rng))
        else:
            path.write_bytes(png_with_params(made.image, mutate_params(real, rng)))
        label = f"png case {case} (seed {SEED + 4})"
        try:
            params = read_params(path)
            request = check_params(params)
            if params.get("model") != real["model"] or params.get("lora") or params.get("inpaint_model") != \
                    real.get("inpaint_model") or params.get("depth_model") != real.get("depth_model"):
                continue  # another model: Engine.load's own checks, fuzzed above; not reloaded per case here
            assert request["num_images"] == 1, label
            results = regenerate(params, engine=engine)  # what --from-png runs once the engine is loaded
        except SdtuneError as exc:
            one_line_error(exc, label)
            outcomes["error"] += 1
            continue
        assert len(results) == 1 and results[0].image.mode == "RGB", label
        outcomes["image"] += 1
    assert outcomes["error"] > 80 and outcomes["image"] > 5, outcomes


def fuzzed_metadata(rng: random.Random, names: list[str]) -> tuple[str, bytes]:
    """A metadata.jsonl or metadata.csv for ``names``: structurally edited rows, or mutated bytes of a good file."""
    rows = [{"file_name": n, "text": f"a photo of sks dog {i}"} for i, n in enumerate(names)]
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            row = rng.choice(rows)
            key = rng.choice(["file_name", "text", "extra"])
            if rng.random() < 0.2:
                row.pop(key, None)
            else:
                row[key] = rng.choice(ODD_VALUES + ["nope.png", "../x.png", names[0], " ", "\n"])
        lines = []
        for row in rows:
            r = rng.random()
            lines.append(json.dumps(rng.choice(ODD_VALUES)) if r < 0.1 else json.dumps(row)[: -1] if r < 0.15
                         else json.dumps(row))
        good = "\n".join(lines)
    else:
        good = "\n".join(json.dumps(r) for r in rows)
    if rng.random() < 0.3:
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["file_name", "text"])
        writer.writerows([[r.get("file_name"), r.get("text")] for r in rows])
        return "metadata.csv", mutate(buf.getvalue().encode(), rng) if rng.random() < 0.7 else buf.getvalue().encode()
    data = good.encode()
    return "metadata.jsonl", mutate(data, rng) if rng.random() < 0.5 else data


def test_fuzzed_image_folders(tmp_path, world_image):
    """120 instance folders with broken metadata.jsonl/.csv, caption files and masks, read as the recipe reads them:
    examples, or one line naming the file."""
    import warnings

    from sdtune.training.sources import Source, read_examples

    rng = random.Random(SEED + 5)
    outcomes = {"error": 0, "read": 0}
    for case in range(120):
        folder = tmp_path / f"folder{case}"
        folder.mkdir()
        names = [f"{i}.png" for i in range(3)]
        for i, name in enumerate(names):
            world_image.rotate(90 * i).save(folder / name)
        what = case % 3
        if what == 0:
            file, data = fuzzed_metadata(rng, names)
            (folder / file).write_bytes(data)
        elif what == 1:
            caption = "a photo of sks dog\non grass".encode()
            (folder / f"{rng.randrange(3)}.txt").write_bytes(mutate(caption, rng) if rng.random() < 0.8 else b"")
        else:
            (folder / "masks").mkdir()
            mask = Image.new("L", world_image.size, 255) if rng.random() < 0.7 else Image.new("L", (3, 5), 255)
            (folder / "masks" / "1.png").write_bytes(mutate(encoded(mask, "PNG"), rng) if rng.random() < 0.7
                                                     else encoded(mask, "PNG"))
        label = f"folder case {case} (seed {SEED + 5})"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                examples = read_examples(Source(instance_dir=str(folder)), default_caption="a photo of sks dog")
                if what == 2:
                    for ex in examples:
                        ex.image_and_mask()
        except SdtuneError as exc:
            one_line_error(exc, label)
            outcomes["error"] += 1
            continue
        assert examples and all(isinstance(e.caption, str) and e.caption.strip() for e in examples), label
        outcomes["read"] += 1
    assert outcomes["error"] > 20 and outcomes["read"] > 20, outcomes


def test_fuzzed_subject_json(tmp_path, world_image):
    """100 subject.json files (edited keys and mutated bytes), read as `sdtune demo --subject` reads them."""
    from sdtune.world.subjects import load_subject

    world_image.save(tmp_path / "0.png")
    good = {"name": "box", "class_noun": "box", "identifier": "sks", "instance_prompt": "a photo of sks box",
            "class_prompt": "a photo of a box", "description": "d",
            "renders": [{"file": "0.png", "position": "left", "background": "grass"}],
            "training": {"output_preservation_weight": 1.0}}
    rng = random.Random(SEED + 6)
    outcomes = {"error": 0, "read": 0}
    for case in range(100):
        meta = json.loads(json.dumps(good))
        for _ in range(rng.randint(0, 2)):
            key = rng.choice(list(meta) + ["renders", "training", "identifier"])
            meta[key] = rng.choice(ODD_VALUES + [[{"position": [1]}], {"lr": 1}, "s k s"])
        text = json.dumps(meta)
        data = mutate(text.encode(), rng) if rng.random() < 0.4 else text.encode()
        (tmp_path / "subject.json").write_bytes(data)
        label = f"subject case {case} (seed {SEED + 6})"
        try:
            subject = load_subject(tmp_path)
        except SdtuneError as exc:
            one_line_error(exc, label)
            outcomes["error"] += 1
            continue
        assert isinstance(subject.identifier, str) and isinstance(subject.training, dict), label
        outcomes["read"] += 1
    assert outcomes["error"] > 30 and outcomes["read"] > 5, outcomes
