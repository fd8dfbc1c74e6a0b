"""CLIPTokenizer's less common calls against transformers' CLIPTokenizer on the same files: text pairs,
offsets, decode's clean-up flag and added tokens (textual inversion's learned words)."""

from __future__ import annotations

import pytest
import transformers
from conftest import CLIP_BPE

from minidiff import CLIPTokenizer
from weights_conversion.clip_vocab import write_hf_tokenizer_files

TEXTS = ["a photo, of a cat", "Hello , world . isn't it ? I 'm fine!", "  spaced   out\ttext ", "émigré café 123"]
PAIRS = ["a dog", "x", "the quick brown fox jumps over the lazy dog", "b"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    folder = write_hf_tokenizer_files(CLIP_BPE, tmp_path_factory.mktemp("tok") / "tok")
    return transformers.CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)


def same(a, b) -> None:
    assert dict(a) == dict(b)


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_mapping(toks, text):
    theirs, ours = toks
    same(theirs(text, return_offsets_mapping=True), ours(text, return_offsets_mapping=True))
    call = dict(return_offsets_mapping=True, padding="max_length", max_length=6, truncation=True)
    same(theirs(text, **call), ours(text, **call))


def test_offsets_as_tensors(toks):
    theirs, ours = toks
    a = theirs(TEXTS, return_offsets_mapping=True, padding=True, return_tensors="pt")
    b = ours(TEXTS, return_offsets_mapping=True, padding=True, return_tensors="pt")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("max_length", [None, 6, 7, 9, 12])
def test_text_pairs(toks, max_length):
    theirs, ours = toks
    call = dict(truncation=True, max_length=max_length) if max_length else {}
    for text, pair in zip(TEXTS, PAIRS):
        same(theirs(text, pair, **call), ours(text, pair, **call))
        same(theirs(text, text_pair=pair, **call), ours(text, text_pair=pair, **call))
    same(theirs(TEXTS, PAIRS, padding=True, **call), ours(TEXTS, PAIRS, padding=True, **call))


def test_pair_must_match_text(toks):
    with pytest.raises(ValueError, match="text_pair"):
        toks[1](["a", "b"], ["c"])


@pytest.mark.parametrize("clean_up", [None, False, True])
def test_decode_clean_up_flag(toks, clean_up):
    theirs, ours = toks
    for text in TEXTS:
        ids = theirs(text).input_ids
        kwargs = {} if clean_up is None else dict(clean_up_tokenization_spaces=clean_up)
        assert ours.decode(ids, **kwargs) == theirs.decode(ids, **kwargs)
        assert ours.batch_decode([ids], **kwargs) == theirs.batch_decode([ids], **kwargs)


def test_added_tokens_match_transformers(toks, tmp_path):
    folder = write_hf_tokenizer_files(CLIP_BPE, tmp_path / "tok")  # fresh copies: tokens are added
    theirs, ours = transformers.CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    for t in (theirs, ours):
        assert t.add_tokens("<cat-toy>") == 1
        assert t.add_tokens(["<cat-toy>", "<Style>", "<Style>_1"]) == 2
    assert len(ours) == len(theirs)
    assert ours.added_tokens_encoder == theirs.added_tokens_encoder
    assert {i: t.content for i, t in ours.added_tokens_decoder.items()} == {
        i: t.content for i, t in theirs.added_tokens_decoder.items()
    }
    for text in ("a <cat-toy> in <Style> <Style>_1 style", "A <CAT-TOY>", "x<cat-toy>y"):
        same(theirs(text), ours(text))
        assert ours.tokenize(text) == theirs.tokenize(text)
