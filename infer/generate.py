"""Generate images: a thin entry point to the same code as ``sdtune infer``.

    python infer/generate.py txt2img --prompt "a photo of sks dog" --out out/
    python infer/generate.py --from-png out/0000-txt2img-0-a-photo-of-sks-dog.png --out again/

Every flag is ``sdtune infer``'s; see ``python infer/generate.py --help``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sdtune.commands.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
