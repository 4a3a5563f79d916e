"""Convert open_clip's BPE merge list into the Hugging Face CLIPTokenizer files.

open_clip ships the original CLIP byte-pair-encoding table (``bpe_simple_vocab_16e6.txt.gz``);
the vocabulary is derived from it deterministically (256 byte symbols, the same with an
end-of-word marker, one entry per merge, then the two special tokens). Writing it as
``vocab.json`` + ``merges.txt`` gives a tokenizer whose ids equal real Stable Diffusion's.

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    unzip -p /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz > /tmp/bpe.gz
    python tools/convert_clip_bpe.py /tmp/bpe.gz data/clip_tokenizer
"""
import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # the size CLIP uses; the file holds more lines than that


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the vocabulary as the printable bytes first, then the remapped ones.
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def main(bpe_gz: str, out_dir: str) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
