#!/usr/bin/env python3
"""Derive CLIP's ``vocab.json`` and ``merges.txt`` from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

OpenAI CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; MIT license) ships its byte-level BPE as one gzip'd text file: a header line, then
merge rules ``"a b"`` in priority order. ``clip/simple_tokenizer.py`` builds the vocabulary from it:

1. the 256 byte symbols of ``bytes_to_unicode()`` (GPT-2's printable stand-ins for raw bytes),
2. the same 256 symbols with the end-of-word marker ``</w>``,
3. one token per merge, the two halves joined, for the first 48,894 merges
   (``lines[1 : 49152 - 256 - 2 + 1]``: a 49,152 budget less the byte symbols and two specials),
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407);

49,408 ids in all. Hugging Face's ``openai/clip-vit-large-patch14`` ``vocab.json`` / ``merges.txt``
(what Stable Diffusion v1 loads) hold exactly this vocabulary and these merges; this script writes
them as plain UTF-8 text, one vocabulary entry per line, so that they diff well in git.

The gzip file is in the ``open_clip_torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``)::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python -c "import zipfile, glob; zipfile.ZipFile(glob.glob('/tmp/oc/*.whl')[0]).extract(
        'open_clip/bpe_simple_vocab_16e6.txt.gz', '/tmp/oc')"
    python scripts/make_clip_tokenizer_files.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz models/tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger("make_clip_tokenizer_files")

# Sizes fixed by OpenAI's simple_tokenizer.py.
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # 48,894
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"
# sha256 of the file in open_clip_torch 3.3.0 (identical to openai/CLIP's copy); logged, not enforced.
KNOWN_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1))
        + list(range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)  # whitespace/control bytes move past Latin-1
            shift += 1
    # simple_tokenizer.py orders the vocabulary as printable bytes first, then the shifted ones.
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def read_merges(gz_path: Path) -> list[tuple[str, str]]:
    """The first 48,894 merge rules of the BPE file (its first line is a version header)."""
    lines = gzip.open(gz_path, "rb").read().decode("utf-8").split("\n")
    rules = lines[1 : NUM_MERGES + 1]
    if len(rules) != NUM_MERGES:
        raise ValueError(f"{gz_path} has {len(rules)} merge lines, expected at least {NUM_MERGES}")
    merges = []
    for number, line in enumerate(rules, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{gz_path} line {number} is not a merge rule 'a b': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in OpenAI's order: bytes, bytes + ``</w>``, merged pairs, the two special tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} unique of {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return vocab


def write_tokenizer_files(gz_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir``; returns their paths."""
    digest = hashlib.sha256(gz_path.read_bytes()).hexdigest()
    if digest != KNOWN_SHA256:
        log.warning("%s has sha256 %s, not the known OpenAI file %s", gz_path, digest, KNOWN_SHA256)
    merges = read_merges(gz_path)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    # indent=0: one entry per line; ensure_ascii=False keeps the byte symbols readable UTF-8.
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    merges_path.write_text(
        "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n", encoding="utf-8"
    )
    log.info("wrote %s (%d tokens) and %s (%d merges)", vocab_path, len(vocab), merges_path, len(merges))
    return vocab_path, merges_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bpe_gz", type=Path, help="path of bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path, help="directory for vocab.json and merges.txt (e.g. models/tokenizer)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.bpe_gz.is_file():
        parser.error(f"BPE file not found: {args.bpe_gz}")
    write_tokenizer_files(args.bpe_gz, args.out_dir)


if __name__ == "__main__":
    main()
