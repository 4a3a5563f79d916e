"""``sdtune config list | show NAME | cp NAME FILE``: the shipped configs, as a starting file of your own."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "config", help="list the shipped configs, print one, or copy one to start your own",
        description="The shipped configs (one YAML file per scenario). Start your own from one: "
                    "`sdtune config show sd15_lora > my.yaml` (or `sdtune config cp sd15_lora my.yaml`), edit it, "
                    "then `sdtune train my.yaml`. Every key with its help: `sdtune train --help-keys`.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the shipped configs and what each is for").set_defaults(func=run_list)
    show = sub.add_parser("show", help="print a shipped config (redirect it to a file to start your own)")
    show.add_argument("name", help="a name from `sdtune config list` (e.g. sd15_lora)")
    show.set_defaults(func=run_show)
    cp = sub.add_parser("cp", help="copy a shipped config to a new file (never overwrites)")
    cp.add_argument("name", help="a name from `sdtune config list`")
    cp.add_argument("file", help="the new file, e.g. my.yaml")
    cp.set_defaults(func=run_cp)
    return p


def _description(path) -> str:
    """A config's first comment line says what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def run_list(args) -> int:
    from sdtune.training.presets import shipped_configs

    configs = shipped_configs()
    width = max(len(p.stem) for p in configs)
    for path in configs:
        print(f"{path.stem:<{width}}  {_description(path)}")
    print(f"\n(in {configs[0].parent}; `sdtune config show NAME > my.yaml` to start your own)", file=sys.stderr)
    return 0


def _shipped(name: str):
    from sdtune.errors import SdtuneError
    from sdtune.training.presets import config_path, shipped_configs

    path = config_path(name)
    if path not in shipped_configs():
        raise SdtuneError(f"{name} is not a shipped config; see sdtune config list")
    return path


def run_show(args) -> int:
    sys.stdout.write(_shipped(args.name).read_text())
    return 0


def run_cp(args) -> int:
    from pathlib import Path

    from sdtune.errors import SdtuneError
    from sdtune.imageio import write_text_atomic

    source, target = _shipped(args.name), Path(args.file).expanduser()
    if target.exists():
        raise SdtuneError(f"{target} already exists; choose a new file name (nothing was overwritten)")
    if not target.parent.is_dir():
        raise SdtuneError(f"folder {target.parent} does not exist; create it first or choose another path")
    write_text_atomic(target, source.read_text())
    print(f"wrote {target} (from {source.stem}); train with: sdtune train {target}")
    return 0
