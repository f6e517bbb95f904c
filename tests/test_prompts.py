"""Weighted prompts (the optimizedSD fork's syntax), prompts files, encoding memoisation and the disk cache."""

from __future__ import annotations

import pytest
import torch

from ldm.errors import UserError

from ldm.conditioning.token_chunks import TokenChunk
from ldm.checkpoints.hashes import checkpoint_fingerprint
from ldm.conditioning.embedding_cache import EmbeddingCache
from ldm.conditioning.fork_syntax import parse_prompt, split_weighted_subprompts
from ldm.conditioning.errors import PromptError
from ldm.conditioning.prompts import PromptEncoder
from ldm.pipeline.input_checks import read_prompts_file


def fork_split_weighted_subprompts(text):
    """The optimizedSD fork's function (optimUtils.py / split_subprompts.py), restated as the reference for
    the inputs where we keep its behaviour (every colon followed by a number, a space or the end)."""
    remaining = len(text)
    prompts, weights = [], []
    while remaining > 0:
        if ":" in text:
            idx = text.index(":")
            prompt = text[:idx]
            remaining -= idx
            text = text[idx + 1 :]
            idx = text.index(" ") if " " in text else len(text)
            weight = float(text[:idx]) if idx != 0 else 1.0
            remaining -= idx
            text = text[idx + 1 :]
            prompts.append(prompt)
            weights.append(weight)
        else:
            if len(text) > 0:
                prompts.append(text)
                weights.append(1.0)
            remaining = 0
    return prompts, weights


@pytest.mark.parametrize(
    "text",
    [
        "tabby cat:0.25 white duck:0.75 hybrid",
        "a house:2 a boat:1",
        "a:1 b:2 c:3",
        "cat:0.5",
        "cat: dog",
        "single prompt without weights",
        "oil painting:-0.5 photo:1.5",
        "x:1e-1 y",
    ],
)
def test_matches_the_fork(text):
    prompts, weights = fork_split_weighted_subprompts(text)
    ours = split_weighted_subprompts(text)
    assert [p for p, _ in ours] == [p.strip() for p in prompts]
    assert [w for _, w in ours] == weights


def test_documented_example():
    assert split_weighted_subprompts("tabby cat:0.25 white duck:0.75 hybrid") == [
        ("tabby cat", 0.25),
        ("white duck", 0.75),
        ("hybrid", 1.0),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cat:abc", [("cat:abc", 1.0)]),  # the fork dropped "abc" with a warning
        ("meet at 10:30am sharp", [("meet at 10:30am sharp", 1.0)]),
        ("a:b:0.5 c", [("a:b", 0.5), ("c", 1.0)]),
        ("ratio 16:9 photo", [("ratio 16", 9.0), ("photo", 1.0)]),  # a number after a colon is a weight
        ("cat:inf", [("cat:inf", 1.0)]),
        ("cat:nan", [("cat:nan", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_non_numbers_after_a_colon_are_text(text, expected):
    assert split_weighted_subprompts(text) == expected


def test_zero_weight_sum_is_a_prompt_error():
    with pytest.raises(PromptError, match="sum to 0"):
        parse_prompt("a:1 b:-1")


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\nfirst prompt\n\n   \nsecond:0.5 third\n  # indented comment\nlast  \n", encoding="utf-8")
    assert read_prompts_file(path) == ["first prompt", "second:0.5 third", "last"]


def test_prompts_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):  # one line, exit 2, as every input error
        read_prompts_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only comments\n\n", encoding="utf-8")
    with pytest.raises(PromptError, match="no prompts"):
        read_prompts_file(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_prompts_file(binary)


class FakeTextEncoder:
    """A deterministic stand-in for CLIP: each text maps to its own random [77, 8] tensor.

    It speaks the chunked protocol of ``CLIPTextEncoder`` (``chunk_prompt`` / ``encode_chunks``) with one
    chunk per text, the chunk carrying the text itself.
    """

    def __init__(self):
        self.seen: list[str] = []

    def chunk_prompt(self, fragments, find_embedding=None):
        assert len(fragments) == 1  # the fork syntax encodes each sub-prompt as one fragment
        return [TokenChunk(ids=[fragments[0].text])]

    def encode_chunks(self, chunks, clip_skip=1):
        return self.encode([chunk.ids[0] for chunk in chunks])

    def encode(self, texts):
        self.seen.extend(texts)
        out = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(map(ord, text)) * 7919 + len(text))
            out.append(torch.randn(77, 8, generator=g))
        return torch.stack(out)


def test_weighted_conditioning_is_the_normalised_weighted_sum():
    fake = FakeTextEncoder()
    encoder = PromptEncoder()
    prompt = "tabby cat:0.25 white duck:0.75 hybrid"
    encoder.encode_missing([prompt], fake)
    expected = (0.25 * fake.encode(["tabby cat"])[0] + 0.75 * fake.encode(["white duck"])[0]
                + 1.0 * fake.encode(["hybrid"])[0]) / 2.0
    torch.testing.assert_close(encoder.conditioning(prompt), expected)
    # a single (weighted or not) sub-prompt is its own encoding, without the weight text
    encoder.encode_missing(["cat:0.5", "cat"], fake)
    torch.testing.assert_close(encoder.conditioning("cat:0.5"), fake.encode(["cat"])[0])
    batch = encoder.batch(prompt, 3, torch.device("cpu"), torch.float32)
    assert batch.shape == (3, 77, 8)
    torch.testing.assert_close(batch[2], expected)


def test_each_text_is_encoded_once():
    fake = FakeTextEncoder()
    encoder = PromptEncoder()
    encoder.encode_missing(["a cat", "a cat", "a cat:1 a dog:2", ""], fake)
    encoder.encode_missing(["a dog", "a cat", ""], fake)
    assert sorted(fake.seen) == sorted(["a cat", "a dog", ""])
    assert encoder.encoder_calls == 3


def test_disk_cache_round_trip(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x" * (3 << 20))
    key = checkpoint_fingerprint(ckpt)
    fake = FakeTextEncoder()
    first = PromptEncoder(EmbeddingCache(tmp_path / "cache", key, torch.float32))
    first.encode_missing(["a cat:1 a dog:3"], fake)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    second = PromptEncoder(EmbeddingCache(tmp_path / "cache", key, torch.float32))
    second.encode_missing(["a cat:1 a dog:3"], pytest.fail)  # everything comes from disk
    torch.testing.assert_close(second.conditioning("a cat:1 a dog:3"), first.conditioning("a cat:1 a dog:3"))

    # another checkpoint (or dtype) does not see these encodings
    ckpt.write_bytes(b"y" + b"x" * ((3 << 20) - 1))
    other = PromptEncoder(EmbeddingCache(tmp_path / "cache", checkpoint_fingerprint(ckpt), torch.float32))
    assert other.missing(["a cat"]) == ["a cat"]
    half = PromptEncoder(EmbeddingCache(tmp_path / "cache", key, torch.float16))
    assert half.missing(["a cat"]) == ["a cat"]


def test_disk_cache_ignores_a_torn_file(tmp_path):
    cache = EmbeddingCache(tmp_path, "key", torch.float32)
    cache.put("a cat", torch.ones(77, 8))
    path = next(tmp_path.glob("*.safetensors"))
    path.write_bytes(b"garbage")
    assert cache.get("a cat") is None


def test_fingerprint_sees_the_end_of_the_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"\0" * (5 << 20))
    b.write_bytes(b"\0" * ((5 << 20) - 1) + b"\1")
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)
