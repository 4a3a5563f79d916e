"""The adapters on the embedded world: every shipped subject trained at equal steps with each adapter (AdamW, the
demo's recipe otherwise), judged as the demo judges its LoRA.

    python bench/adapters.py                                        # every subject, every adapter, --steps 1500
    python bench/adapters.py --steps 600 --prompts 8 --runs lora,loha --subjects checker_box
    python bench/adapters.py --tiny --steps 2 --prompts 2 --sample-steps 2 --class-images 2   # smoke (a minute)

The measuring is ``bench/optimizers.py``'s (one process per run, its loop time and peak memory, the judge's subject
fidelity, prompt fidelity and prior preservation on fixed seeds); this script only names the runs. Each adapter
keeps the demo's rank, alpha, targets and learning rate, so the comparison is at equal settings, not each at its
best; OFT, which has no rank, takes blocks of 32 (the embedded family's layers are multiples of 32 wide). The file
size is that of the file each run's engine loads.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import optimizers  # noqa: E402  (bench/optimizers.py: the measuring)

RUNS = {
    "lora": [],
    "dora": ["adapter=dora"],
    "loha": ["adapter=loha"],
    "lokr": ["adapter=lokr"],
    "oft": ["adapter=oft", "oft_block_size=32", "lora_targets=attention"],  # peft's OFT: linear layers only
}


def file_sizes(work: Path) -> dict[str, float]:
    """"subject/run" -> the size in KB of the adapter file the engine loads from that run's folder."""
    from sdtune.models.lora import find_lora_file

    sizes = {}
    for lora in sorted(work.glob("*/*/lora")):
        try:
            sizes[f"{lora.parent.parent.name}/{lora.parent.name}"] = round(find_lora_file(lora).stat().st_size / 1024,
                                                                           1)
        except Exception:  # a run that did not finish
            continue
    return sizes


def main(argv=None) -> int:
    import argparse
    import json
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    optimizers.RUNS.update(RUNS)
    if not any(a == "--runs" or a.startswith("--runs=") for a in argv):
        argv += ["--runs", ",".join(RUNS)]
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--work")
    pick.add_argument("--out")
    where, _ = pick.parse_known_args(argv)
    if where.work is None:  # the file sizes are read from the runs' folders afterwards
        where.work = tempfile.mkdtemp(prefix="sdtune-bench-adapters-")
        argv += ["--work", where.work]
    code = optimizers.main(argv)
    sizes = file_sizes(Path(where.work))
    print("adapter file sizes (KB): " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    if where.out and Path(where.out).is_file():
        data = json.loads(Path(where.out).read_text())
        data["file_kb"] = sizes
        Path(where.out).write_text(json.dumps(data, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
