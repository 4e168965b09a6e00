"""Rebuild vocab.json + merges.txt here from open_clip's CLIP BPE file (bpe_simple_vocab_16e6.txt.gz).

The files are shipped so nothing has to download a tokenizer; this script only documents and repeats
how they were made:  python build_vocab.py /path/to/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps the first 48,894 merges (49,408 tokens = 2 * 256 byte tokens + merges + 2 specials).
MERGE_COUNT = 49408 - 256 - 256 - 2


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-in for every byte, in CLIP's vocab order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build(gz_path: str | Path, out_dir: str | Path) -> None:
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 1 + MERGE_COUNT]  # line 0 is a "#version" header
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    (out / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    build(sys.argv[1], Path(__file__).parent)
