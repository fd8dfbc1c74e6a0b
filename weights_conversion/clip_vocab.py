"""OpenAI's original CLIP BPE file -> the Hugging Face tokenizer files (vocab.json + merges.txt).

OpenAI ships CLIP's vocabulary as `bpe_simple_vocab_16e6.txt.gz`: a header line, then BPE merges
("a b" per line), far more than CLIP uses. Its `SimpleTokenizer` builds the vocabulary as:
  1. the 256 byte symbols of GPT-2's byte->unicode table, in that table's order;
  2. the same 256 symbols with the end-of-word suffix `</w>`;
  3. the first 49152 - 256 - 2 = 48894 merges, each joined ("i n" -> "in");
  4. `<|startoftext|>` (49406) and `<|endoftext|>` (49407).
The Hugging Face files hold exactly that vocabulary (vocab.json) and those merges (merges.txt,
after a "#version: 0.2" header), which is what this module writes.

References
1. OpenAI CLIP, clip/simple_tokenizer.py: https://github.com/openai/CLIP
2. GPT-2's bytes_to_unicode, openai/gpt-2 src/encoder.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
# CLIP's vocabulary size is fixed by the released model: 256 bytes x 2 + merges + 2 specials
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (BPE cannot work on raw bytes).

    Printable Latin-1 bytes map to themselves; the other 68 (control characters, space, ...)
    map to chr(256 + n) in byte order, so no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def read_bpe_merges(gz_path: str | os.PathLike) -> list[tuple[str, str]]:
    """The merges CLIP uses from OpenAI's gzipped BPE file (its first line is a header)."""
    path = Path(gz_path)
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the gzipped CLIP BPE file {path}: {e}") from e
    lines = text.split("\n")[1 : NUM_MERGES + 1]
    if len(lines) < NUM_MERGES:
        raise ValueError(f"{path} holds {len(lines)} merges; CLIP needs {NUM_MERGES}")
    merges = []
    for i, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}, line {i}: expected a merge 'a b', found {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def vocab_and_merges(gz_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token -> id vocabulary and its ranked merges, built as OpenAI's SimpleTokenizer does."""
    merges = read_bpe_merges(gz_path)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # a repeated token would silently shift every later id
        raise ValueError(f"{gz_path}: built {len(vocab)} distinct tokens from {len(tokens)}, expected {VOCAB_SIZE}")
    return vocab, merges


def tokenizer_config(pad_token: str = EOS_TOKEN) -> dict[str, object]:
    """tokenizer_config.json as in the SD checkpoints (pad "<|endoftext|>" for SD1, "!" for SD2)."""
    return {
        "add_prefix_space": False,
        "bos_token": BOS_TOKEN,
        "do_lower_case": True,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    }


def write_vocab_files(
    vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """vocab.json and merges.txt in the Hugging Face byte-level BPE layout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    vocab_path.write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def write_special_files(out_dir: str | os.PathLike, config: dict[str, object]) -> None:
    """tokenizer_config.json and special_tokens_map.json (the special tokens of `config`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in config}
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def write_hf_tokenizer_files(
    gz_path: str | os.PathLike, out_dir: str | os.PathLike, pad_token: str = EOS_TOKEN
) -> Path:
    """Write a complete Hugging Face CLIP tokenizer folder from OpenAI's BPE file; returns the folder."""
    vocab, merges = vocab_and_merges(gz_path)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    write_vocab_files(vocab, merges, out_dir)
    write_special_files(out_dir, tokenizer_config(pad_token))
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gz_path", help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", help="the tokenizer folder to write")
    parser.add_argument("--pad-token", default=EOS_TOKEN, help='"<|endoftext|>" (SD1, default) or "!" (SD2)')
    args = parser.parse_args(argv)
    out = write_hf_tokenizer_files(args.gz_path, args.out_dir, pad_token=args.pad_token)
    print(f"wrote {out}/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json")


if __name__ == "__main__":
    main()
