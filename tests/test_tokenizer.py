"""The CLIP tokenizer files and ``CLIPTextEncoder.tokenize`` against OpenAI's original algorithm.

The oracle below re-implements OpenAI CLIP's ``clip/simple_tokenizer.py`` (``bytes_to_unicode``,
``get_pairs``, greedy lowest-rank BPE, CLIP's pre-tokenizer regex, ftfy + double HTML unescape +
whitespace collapse + lowercase) in plain Python, building its vocabulary from ``merges.txt`` alone the way
OpenAI builds it from the gzip'd merges. ``CLIPTextEncoder.tokenize`` goes through transformers' Rust
``CLIPTokenizer`` with ``vocab.json``, so the two share only the merge list.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from ldm.config import TextEncoderConfig
from ldm.conditioning.text_encoder import DEFAULT_TOKENIZER_DIR, CLIPTextEncoder

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "models" / "tokenizer"
CONTEXT_LENGTH = 77


# --- oracle: OpenAI CLIP's SimpleTokenizer, written out independently -------------------------------


def oracle_bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def oracle_get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


class OracleTokenizer:
    """OpenAI's SimpleTokenizer: vocabulary = bytes, bytes + </w>, merges joined, two specials."""

    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        self.byte_encoder = oracle_bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.vocab = vocab
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = oracle_get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if first not in word[i:]:
                    merged.extend(word[i:])
                    break
                j = word.index(first, i)
                merged.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = oracle_get_pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in regex.findall(self.pattern, text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def tokenize(self, text: str) -> list[int]:
        """SD v1 layout: start, at most 75 tokens, end, padded with the end token to 77."""
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        ids = [sot] + self.encode(text)[: CONTEXT_LENGTH - 2] + [eot]
        return ids + [eot] * (CONTEXT_LENGTH - len(ids))


def read_merges_txt(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    return [tuple(line.split(" ")) for line in lines[1:] if line]


@pytest.fixture(scope="module")
def oracle() -> OracleTokenizer:
    return OracleTokenizer(read_merges_txt(TOKENIZER_DIR / "merges.txt"))


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def encoder() -> CLIPTextEncoder:
    tiny = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, projection_dim=32)
    return CLIPTextEncoder(tiny)


# --- the files ------------------------------------------------------------------------------------


def test_files_are_plain_text_in_the_default_dir():
    assert DEFAULT_TOKENIZER_DIR.resolve() == TOKENIZER_DIR
    for name in ("vocab.json", "merges.txt"):
        data = (TOKENIZER_DIR / name).read_bytes()
        assert not data.startswith(b"\x1f\x8b") and b"\x00" not in data
        data.decode("utf-8")


def test_merges_txt_has_openai_merge_count():
    merges = read_merges_txt(TOKENIZER_DIR / "merges.txt")
    assert len(merges) == 49152 - 256 - 2 == 48894
    assert all(len(m) == 2 and all(m) for m in merges)
    assert merges[0] == ("i", "n") and merges[1] == ("t", "h")


def test_vocab_json_is_openai_vocabulary(vocab, oracle):
    assert len(vocab) == 49408
    assert vocab == oracle.encoder  # same tokens, same ids, built from merges.txt the way OpenAI does
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # Pinned ids read from the data (and shown in transformers' CLIP docs for "a photo of a cat").
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125
    assert vocab["of</w>"] == 539 and vocab["cat</w>"] == 2368
    assert vocab["Ā"] == 188 and vocab["!</w>"] == 256  # first shifted byte symbol, first </w> symbol


@pytest.mark.skipif(
    not os.environ.get("CLIP_BPE_GZ"), reason="set CLIP_BPE_GZ to OpenAI's bpe_simple_vocab_16e6.txt.gz"
)
def test_files_match_openai_gzip(tmp_path, vocab):
    """Regenerate from the original file (outside the repo) and compare byte for byte."""
    script_path = REPO / "scripts" / "make_clip_tokenizer_files.py"
    spec = importlib.util.spec_from_file_location("make_clip_tokenizer_files", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    gz_path = Path(os.environ["CLIP_BPE_GZ"])
    script.write_tokenizer_files(gz_path, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes()
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    assert read_merges_txt(TOKENIZER_DIR / "merges.txt") == [tuple(x.split()) for x in lines[1:48895]]


# --- tokenize() against the oracle ----------------------------------------------------------------

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   leading, trailing and    multiple\tspaces\n\nnewlines   ",
    "Hello, world! (masterpiece:1.2), [best quality]; 8k uhd; f/1.8 -- 50mm?!...",
    "it's a \u201cquoted\u201d phrase \u2014 with an em dash \u2013 and it\u2019s curly",
    "salt &amp; pepper, &lt;tag&gt;, double &amp;amp; escaped, &#39;numeric&#39;",
    "a dog \U0001F436 wearing sunglasses \U0001F60E\U0001F525 and a flag \U0001F1EF\U0001F1F5",
    "\u5bcc\u58eb\u5c71\u3068\u685c\u306e\u98a8\u666f, \u4e00\u5e45\u4e2d\u56fd\u5c71\u6c34\u753b",
    "caf\u00c3\u00a9 mojibake and na\u00efve caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",
    "numbers 1234567 and 3.14159, 1920x1080, #hashtag @user 100%",
    "Stra\u00dfe \u0130stanbul \u03a3\u03bf\u03c6\u03af\u03b1 \u041c\u043e\u0441\u043a\u0432\u0430 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "<|endoftext|> inside a prompt",
]
LONG_PROMPT = ", ".join(
    f"highly detailed {word} by greg rutkowski, trending on artstation" for word in
    ["castle", "forest", "dragon", "knight", "river", "mountain", "sunset", "storm", "ocean", "tower"]
)


@pytest.mark.parametrize("prompt", PROMPTS + [LONG_PROMPT])
def test_tokenize_matches_openai_oracle(encoder, oracle, prompt):
    ids = encoder.tokenize([prompt])
    assert ids.shape == (1, CONTEXT_LENGTH)
    assert ids[0].tolist() == oracle.tokenize(prompt)


def test_known_sequence(encoder):
    assert encoder.tokenize(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_long_prompt_is_truncated_with_end_token(encoder, oracle):
    assert len(oracle.encode(LONG_PROMPT)) > 100
    ids = encoder.tokenize([LONG_PROMPT])[0].tolist()
    assert ids[0] == 49406 and ids[-1] == 49407
    assert 49407 not in ids[1:-1]  # 75 prompt tokens, no padding
    assert ids[1:-1] == oracle.encode(LONG_PROMPT)[:75]


def test_batch_padding_and_dtype(encoder, oracle):
    ids = encoder.tokenize(["a photo of a cat", "", LONG_PROMPT])
    assert ids.dtype == torch.int64
    assert ids.shape == (3, CONTEXT_LENGTH)
    assert ids[1].tolist() == [49406] + [49407] * 76  # SD v1 pads with the end token, not 0
    assert [row.tolist() for row in ids] == [oracle.tokenize(p) for p in ("a photo of a cat", "", LONG_PROMPT)]


def test_tokenize_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError):
        encoder.tokenize("a photo of a cat")
