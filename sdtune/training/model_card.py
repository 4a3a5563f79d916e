"""The README.md model card that travels with every training output (Hugging Face card layout)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from sdtune.imageio import write_text_atomic


def render_model_card(config: dict, *, base_model: str, method: str, steps: int, family: str,
                      prediction_type: str, files: list[str], samples: list[str],
                      evaluation: dict | None = None) -> str:
    """Markdown with YAML front matter: base model, prompts, how to load, the full config, samples."""
    prompt = config.get("instance_prompt", "")
    tags = ["stable-diffusion", "text-to-image", "diffusers", "dreambooth", "sdtune"]
    cls = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    if family == "sdxl":
        tags.insert(1, "stable-diffusion-xl")
    if method == "lora":
        tags.append("lora")
    front = ["---", f"base_model: {json.dumps(base_model)}", f"instance_prompt: {json.dumps(prompt)}",
             "library_name: diffusers", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    kind = config.get("adapter") or "lora"
    if method == "lora" and kind in ("loha", "lokr", "oft"):
        how = ("sdtune loads it: `sdtune infer txt2img --lora path/to/this/folder --prompt ...` "
               "(`adapter_model.safetensors`: peft's own keys and configs). Stock diffusers' `load_lora_weights` "
               "does not read LoHa, LoKr or OFT files."
               + (" `lycoris.safetensors` holds the same weights in LyCORIS' layout under kohya's names, for ComfyUI, "
                  "AUTOMATIC1111/Forge and kohya's tools." if kind != "oft" else ""))
    elif method == "lora":
        how = (f"```python\nfrom diffusers import {cls}\n"
               f"pipe = {cls}.from_pretrained({json.dumps(base_model)})\n"
               "pipe.load_lora_weights(\"path/to/this/folder\")\n"
               f"image = pipe({json.dumps(prompt)}).images[0]\n```\n\n"
               "ComfyUI's Load LoRA node reads `pytorch_lora_weights.safetensors` too. "
               "`lora_kohya.safetensors` holds the same weights with kohya's key names, for AUTOMATIC1111/Forge "
               "and kohya's tools.")
    else:
        how = (f"```python\nfrom diffusers import {cls}\n"
               f"pipe = {cls}.from_pretrained(\"path/to/this/folder\")\n"
               f"image = pipe({json.dumps(prompt)}).images[0]\n```")
    prior = (f"with prior preservation on \"{config.get('class_prompt')}\" "
             f"(weight {config.get('prior_loss_weight')})" if config.get("with_prior_preservation")
             else "without prior preservation")
    if config.get("output_preservation_weight"):
        prior += f", output preservation (weight {config.get('output_preservation_weight')})"
    lines = front + [
        f"# DreamBooth {'LoRA' if method == 'lora' else 'fine-tune'} of {base_model}", "",
        f"Trained with sdtune for {steps} steps on the subject \"{prompt}\", {prior}, "
        f"caption dropout {config.get('caption_dropout')}"
        + (f", conditional pull {config.get('conditional_pull')} (the base model's own objective)"
           if config.get("conditional_pull") else "") + ".", "",
        f"- base model: `{base_model}` ({family}, {prediction_type} prediction)",
        f"- method: {method}" + (f" ({kind}, rank {config.get('lora_rank')}, alpha "
                                  f"{config.get('lora_alpha') or config.get('lora_rank')})" if method == "lora" and
                                  kind != "oft" else f" (oft, blocks of {config.get('oft_block_size')})"
                                  if method == "lora" else ""),
        f"- text encoder trained: {bool(config.get('train_text_encoder'))}",
        f"- resolution: {config.get('resolution')}, learning rate: {config.get('learning_rate')}",
        f"- files: {', '.join(f'`{f}`' for f in files)}", "",
        "## How to use", "", how, "",
    ]
    if samples:
        lines += ["## Samples", ""]
        lines += [f"![{Path(s).stem}]({s})" for s in samples] + [""]
        lines += [f"Validation prompts: {', '.join(repr(p) for p in config.get('validation_prompts') or [])}", ""]
    lines += evaluation_section(evaluation or {})
    lines += ["## Training config", "", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def evaluation_section(evaluation: dict) -> list[str]:
    """The in-loop evaluation: the kept step and why, the recommended settings, the curves and their table."""
    if not evaluation.get("history"):
        return []
    lines = ["## When the subject was learned", "", evaluation["verdict"] + ".", ""]
    if evaluation.get("best") is not None and evaluation.get("kept_step") != evaluation.get("last_step"):
        lines += [f"The kept weights (step {evaluation['kept_step']}) are in `best/`, beside the last ones "
                  f"(step {evaluation['last_step']}).", ""]
    s = evaluation.get("settings")
    if s:
        interval = f", guidance interval `{s['guidance_interval']}`" if s.get("guidance_interval") else ""
        lines += [f"**Recommended settings**: guidance {s['guidance']:g}, LoRA scale {s['lora_scale']:g}{interval} "
                  "(the highest likeness within the bounds on the evaluation prompts; `sdtune infer` and the web UI "
                  "use them when you give none).", "",
                  "| guidance | LoRA scale | interval | likeness | prompt following | drift | bleed |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['guidance']:g} | {r['lora_scale']:g} | {r.get('guidance_interval') or '-'} | "
                  + " | ".join(_cell(r.get(q)) for q in ("likeness", "prompt_following", "drift", "bleed")) + " |"
                  for r in s.get("table", [])]
        lines.append("")
    lines += [f"![evaluation curves]({evaluation.get('plot', 'eval.svg')})", "",
              "| step | likeness | prompt following | drift | bleed | within bounds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | " + " | ".join(_cell(r.get(q)) for q in ("likeness", "prompt_following", "drift",
                                                                        "bleed"))
              + f" | {'yes' if r.get('eligible') else 'no'} |" for r in evaluation["history"]]
    return lines + ["", "Every metric of every evaluation: `eval.jsonl`.", ""]


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def write_model_card(output_dir: str | os.PathLike, **kwargs) -> Path:
    return write_text_atomic(Path(output_dir) / "README.md", render_model_card(**kwargs))
