"""Write the world's subjects as DreamBooth instance folders: data/subjects/<name>/ (4 renders, their masks,
subject.json; a caption per render too for the subjects that ship with captions, or for all with --captions,
or for none with --no-captions).

    python train/make_subjects.py [--out data/subjects] [--only crescent] [--captions | --no-captions]

Deterministic: the same code writes the same pixels (the renders' seeds are in sdtune/world/subjects.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdtune.world import scenes  # noqa: E402
from sdtune.world.subjects import SUBJECTS_DIR, write_subject  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(SUBJECTS_DIR), help="folder for the subject folders")
    ap.add_argument("--only", action="append", choices=list(scenes.SUBJECTS), help="write only these subjects")
    ap.add_argument("--captions", action=argparse.BooleanOptionalAction, default=None,
                    help="a caption per render: its context, or the instance prompt alone (NN.txt, two lines); "
                         "default: as each subject ships (scenes.SUBJECTS)")
    args = ap.parse_args(argv)
    for name in args.only or scenes.SUBJECTS:
        print("wrote", write_subject(name, Path(args.out) / name, captions=args.captions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
