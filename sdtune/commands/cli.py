"""The ``sdtune`` command: one entry point, a subcommand per job.

Each subcommand lives in ``sdtune/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``; heavy libraries are imported inside ``run`` so ``--help`` stays instant.
A ``SdtuneError`` becomes one line on stderr and exit code 2 - never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sdtune import console
from sdtune.errors import SdtuneError, disk_reason

COMMANDS = ("infer", "inspect", "train", "config", "eval", "demo", "ui", "lora")


def build_parser() -> argparse.ArgumentParser:
    from sdtune import __version__

    parser = argparse.ArgumentParser(prog="sdtune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"sdtune.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"sdtune.commands.{name}":
                raise
            continue  # a command not built yet
        module.add_parser(sub)
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` on a parser and every subcommand under it (``sdtune --verbose infer`` and
    ``sdtune infer ... --verbose`` both work; a subparser must not reset what the top level set)."""
    top = parser.prog == "sdtune"
    parser.add_argument("--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="also show the libraries' own notices, loading bars and warnings")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow a flag (`sdtune train c.yaml --dry-run max_steps=5`), which argparse's
    # positional list alone does not take
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.setup(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except SdtuneError as exc:
        _close_progress_bars()
        print(f"sdtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a full or read-only disk anywhere not already said better: still one line
        reason = disk_reason(exc)
        if reason is None:
            raise
        _close_progress_bars()
        where = f" while writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"sdtune: error: {reason}{where}; free some space (or choose another folder) and run again",
              file=sys.stderr)
        return SdtuneError.exit_code
    except KeyboardInterrupt:
        print("sdtune: interrupted", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End any progress bar still drawn (an error mid-loop), so the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
