"""The argument checks and file readers of minidiff/tokenizer.py: prompts, padding and truncation modes,
AddedToken flags from configs, BPE tables from vocab.json + merges.txt or a tokenizer.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers.models import BPE

from .loading import CheckpointError, load_json

Token = str | AddedToken
_TOKEN_FLAGS = ("content", "single_word", "lstrip", "rstrip", "normalized")


class BatchEncoding(dict):
    """`input_ids` and `attention_mask`, readable as keys or attributes (like transformers)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _as_added_token(token: Token | dict[str, Any], name: str, special: bool = True) -> AddedToken:
    """A token from a config: a string, or a serialised AddedToken dict whose flags matter
    (`normalized: true`, as in older SD configs, makes `<|ENDOFTEXT|>` match after lowercasing)."""
    if isinstance(token, AddedToken):
        return token
    if isinstance(token, str):
        return AddedToken(token, special=special, normalized=False)
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return AddedToken(**{k: token[k] for k in _TOKEN_FLAGS if k in token}, special=special)
    raise TypeError(f"{name} must be a string or an AddedToken dict with a 'content', got {token!r}")


def _made_special(token: AddedToken) -> AddedToken:
    """The same token flagged special (bos/eos/unk/pad always are: decode can skip them)."""
    return token if token.special else AddedToken(**{k: getattr(token, k) for k in _TOKEN_FLAGS}, special=True)


def _check_text(text: Any) -> tuple[list[str], bool]:
    """The prompts as a list, and whether a single string was given."""
    if isinstance(text, str):
        return [text], False
    if isinstance(text, (list, tuple)):
        for i, t in enumerate(text):
            if not isinstance(t, str):
                raise TypeError(f"prompt {i} of the batch is a {type(t).__name__}, not a string: {t!r:.60}")
        if not text:
            raise ValueError("the batch of prompts is empty")
        return list(text), True
    raise TypeError(f"the prompt must be a string or a list of strings, got a {type(text).__name__}: {text!r:.60}")


def _padding_mode(padding: bool | str) -> str | None:
    """None (no padding), "longest" or "max_length"."""
    if padding is False or padding == "do_not_pad":
        return None
    if padding is True or padding == "longest":
        return "longest"
    if padding == "max_length":
        return "max_length"
    raise ValueError(f"padding must be False, True, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")


def _truncates(truncation: bool | str | None) -> bool:
    if truncation is None or truncation is False or truncation == "do_not_truncate":
        return False
    if truncation is True or truncation in ("longest_first", "only_first"):
        return True
    raise ValueError(f"truncation must be True, False or 'longest_first', got {truncation!r}")


def _read_bpe_files(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    try:
        return BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as e:  # the Rust reader raises plain Exceptions
        raise CheckpointError(f"cannot read the BPE files {vocab_path} and {merges_path}: {e}") from e


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a `tokenizers` tokenizer.json with a BPE model."""
    model = load_json(path).get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        raise CheckpointError(f"{path} does not hold a BPE model with a vocab and merges")
    # merges are "a b" strings in older files, [a, b] pairs in newer ones
    return vocab, [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _longest_first(a: list, b: list, budget: int) -> tuple[list, list]:
    """Cut a pair to `budget` tokens as the tokenizers library's 'longest_first' does: only the longer
    one if that suffices, else the shorter keeps budget // 2 and the longer the rest. A single text
    (b empty) is simply cut."""
    if len(a) + len(b) <= budget:
        return a, b
    if not b:
        return a[:budget], b
    short, long = sorted((len(a), len(b)))
    keep_short, keep_long = short, max(short, budget - short) if short <= budget else short
    if keep_short + keep_long > budget:
        keep_short, keep_long = budget // 2, budget // 2 + budget % 2
    n_a, n_b = (keep_short, keep_long) if len(a) <= len(b) else (keep_long, keep_short)
    return a[:n_a], b[:n_b]
