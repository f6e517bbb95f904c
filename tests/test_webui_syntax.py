"""The webui's prompt syntax: its own documented examples (``modules/prompt_parser.py`` doctests), escapes,
BREAK, unbalanced brackets, and the features we only recognise to warn about."""

from __future__ import annotations

import pytest

from ldm.conditioning.token_chunks import Fragment
from ldm.conditioning.webui_syntax import (
    WebuiSyntaxError,
    parse_fragments,
    parse_prompt_attention,
    unsupported_features,
)

# The webui's doctests of parse_prompt_attention, verbatim (inputs and expected outputs).
WEBUI_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", WEBUI_DOCTESTS)
def test_the_webuis_documented_examples(text, expected):
    # exact float equality: the same products in the same order as the webui
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a (red:1.3) cat, [blurry]", [("a ", 1.0), ("red", 1.3), (" cat, ", 1.0), ("blurry", 1 / 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("((a:1.5) b)", [("a", 1.5 * 1.1), (" b", 1.1)]),
        ("(a : 1.3 )", [("a ", 1.3)]),  # spaces around the number (webui >= 1.6)
        ("(a:-0.5)", [("a", -0.5)]),
        ("(a:0)", [("a", 0.0)]),
    ],
)
def test_weights_and_nesting(text, expected):
    got = parse_prompt_attention(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-15)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\(a\\) \\[b\\]", [("(a) [b]", 1.0)]),
        ("back\\\\slash", [("back\\slash", 1.0)]),
        ("lone\\ backslash", [("lone backslash", 1.0)]),  # a backslash before anything else vanishes
        ("(\\(a\\))", [("(a)", 1.1)]),  # escaped brackets inside real ones
    ],
)
def test_escapes(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("a ) b ] c", [("a ) b ] c", 1.0)]),  # closers that close nothing are text
        ("(a:2", [("a:2", 1.1)]),  # never closed: the colon is text, the bracket weighs 1.1
        ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight with no open bracket is text
        ("(a [b) c]", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1 / 1.1)]),  # crossed: each closes its own kind
        ("((a][:b:c", [("a]", 1.1 * 1.1), (":b:c", 1.1 * 1.1 / 1.1)]),  # "[" opens after "a]", never closes
    ],
)
def test_unbalanced_brackets_as_the_webui_treats_them(text, expected):
    got = parse_prompt_attention(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-15)


def test_break():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_fragments("a cat BREAK a dog") == [
        Fragment("a cat"), Fragment("", 1.0, breaks_chunk=True), Fragment("a dog")]
    assert parse_fragments("BREAK") == [Fragment(""), Fragment("", 1.0, breaks_chunk=True), Fragment("")]
    # only the capitalised word, on word boundaries
    assert parse_prompt_attention("break BREAKS aBREAK") == [("break BREAKS aBREAK", 1.0)]
    assert parse_prompt_attention("a\nBREAK\nb") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]


def test_break_inside_brackets_becomes_the_word_with_a_negative_weight_as_in_the_webui():
    # the webui multiplies the BREAK marker's -1 by the bracket, after which it no longer is a marker
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    fragments = parse_fragments("(a BREAK b)")
    assert not any(fragment.breaks_chunk for fragment in fragments)
    assert fragments[1] == Fragment("BREAK", -1.1)


def test_empty_prompt():
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("()") == [("", 1.0)]


def test_a_weight_that_is_no_number_is_an_error():
    with pytest.raises(WebuiSyntaxError, match="not a number"):
        parse_prompt_attention("(cat:1.2.3)")


def test_unsupported_features_are_named():
    assert unsupported_features("a [cat:dog:0.5] in a [red|blue] room AND a tree") == [
        "prompt editing [from:to:when]", "alternation [a|b]", "composable diffusion (AND)"]
    assert unsupported_features("a [cat:5]") == ["prompt editing [from:to:when]"]
    assert unsupported_features("a (red:1.3) cat, [blurry], android") == []
