"""CLIPTokenizer: CLIP's byte-level BPE tokenizer, built on the `tokenizers` library.

The text pipeline, step by step (the same as transformers' CLIPTokenizer, id for id):
  1. special tokens (`<|startoftext|>`, `<|endoftext|>`, and the pad token — "!" for SD2) are
     split out of the raw text first, so a literal `<|endoftext|>` in a prompt is the EOS id
     and, with SD2's files, every "!" is id 0 ("!!" never becomes its own BPE token);
  2. normalise the rest: Unicode NFC, every whitespace run -> one space, lowercase;
  3. pre-tokenise with CLIP's regex (contractions, letter runs, single digits, punctuation
     runs; whitespace is dropped) and map each UTF-8 byte to GPT-2's printable byte alphabet;
  4. BPE-merge each word, its last symbol carrying the end-of-word suffix `</w>`;
  5. `<|startoftext|>` + ids + `<|endoftext|>`; truncation cuts the words, never the EOS;
     padding appends the pad id with attention mask 0.

References
1. Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021
   (CLIP); OpenAI's clip/simple_tokenizer.py.
2. Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units", 2016 (BPE).
3. transformers, models/clip/tokenization_clip.py (the behaviour matched here).
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from weights_conversion.clip_vocab import vocab_and_merges  # OpenAI's BPE file format lives there

from . import files
from .loading import CheckpointError, load_json, resolve_file
from .tokenizer_inputs import (
    _TOKEN_FLAGS,
    BatchEncoding,
    Token,
    _as_added_token,
    _check_text,
    _longest_first,
    _made_special,
    _padding_mode,
    _read_bpe_files,
    _read_tokenizer_json,
    _truncates,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77  # CLIP's context length (position embeddings)
_DEFAULT_VOCAB = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP's pre-tokenizer: the two special tokens, contractions, letter runs, ONE digit at a time,
# runs of anything else that is not whitespace (whitespace itself is dropped)
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order
TextInput = str | Sequence[str]


def _token_id_property(name: str) -> property:
    """A read-only `<name>_id` property: the id of the special token held in attribute `name`."""
    return property(lambda self: self._tokenizer.token_to_id(getattr(self, name)), doc=f"The id of {name}.")


class CLIPTokenizer:
    """CLIP's tokenizer: `tok(prompts, padding="max_length", max_length=77, truncation=True,
    return_tensors="pt").input_ids`."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: Token = BOS_TOKEN,
        eos_token: Token = EOS_TOKEN,
        unk_token: Token = EOS_TOKEN,
        pad_token: Token = EOS_TOKEN,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        added_tokens: Iterable[AddedToken] = (),
    ) -> None:
        special = {
            name: _as_added_token(tok, name)
            for name, tok in zip(_SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token))
        }
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (special[n].content for n in _SPECIAL_NAMES)
        self.model_max_length = model_max_length

        model = BPE(
            vocab=vocab, merges=merges, unk_token=self.unk_token, end_of_word_suffix=END_OF_WORD,
            continuing_subword_prefix="", fuse_unk=False, dropout=None,
        )  # fmt: skip
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # invert=True: the regex matches are the words; what lies between (spaces) is removed
                pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Which spelling of a token counts (its flags decide how it is matched), as in transformers:
        # tokens listed in the config's added_tokens_decoder first, and a named special token only
        # if that list lacks it and it is not an exact repeat; then, as tokenizers' add_tokens
        # does, the LAST spelling of a content wins (SD1's plain "<|endoftext|>" pad token after a
        # normalized=True eos makes the EOS match only literally again).
        queue = list(added_tokens)
        listed = {t.content for t in queue}
        for t in special.values():
            if t.content not in listed and t not in queue:
                queue.append(t)
        named = {t.content for t in special.values()}
        chosen = {t.content: _made_special(t) if t.content in named else t for t in queue}
        tok.add_tokens(list(chosen.values()))  # keeps each token's own `special` flag
        self._tokenizer = tok

        for name in _SPECIAL_NAMES:
            if tok.token_to_id(getattr(self, name)) is None:
                raise ValueError(f"{name} {getattr(self, name)!r} is not in the vocabulary")

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        subfolder: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> CLIPTokenizer:
        """Load vocab.json + merges.txt (+ tokenizer_config.json / special_tokens_map.json) from a
        folder or Hub repo. kwargs (`pad_token="!"`, `model_max_length=...`) override the files."""
        get = lambda name, required: resolve_file(  # noqa: E731
            path_or_hub_id, name, subfolder, local_files_only=local_files_only, required=required
        )
        vocab_path = get("vocab.json", False)
        if vocab_path is not None:
            vocab, merges = _read_bpe_files(vocab_path, get("merges.txt", True))
        else:
            # transformers 5 saves only the fast tokenizer's tokenizer.json: its BPE model holds the same tables
            fast_path = get("tokenizer.json", False)
            if fast_path is None:
                where = f"{path_or_hub_id}" + (f"/{subfolder}" if subfolder else "")
                raise FileNotFoundError(
                    f"no tokenizer in {where}: it needs vocab.json + merges.txt (or tokenizer.json)"
                )
            vocab, merges = _read_tokenizer_json(fast_path)
        config_path, special_path = get("tokenizer_config.json", False), get("special_tokens_map.json", False)
        config = load_json(config_path) if config_path else {}
        # transformers' precedence: kwargs > special_tokens_map.json > tokenizer_config.json, and
        # special_tokens_map.json is ignored when the config lists its added tokens itself
        if special_path and "added_tokens_decoder" not in config:
            config.update(load_json(special_path))
        config.update(kwargs)

        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise CheckpointError(f"added_tokens_decoder in {config_path} must be an object")
        added = [
            _as_added_token(entry, f"added token {i}", special=isinstance(entry, dict) and bool(entry.get("special")))
            for i, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]))
        ]

        tokens = {name: config[name] for name in _SPECIAL_NAMES if config.get(name) is not None}
        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise CheckpointError(f"model_max_length must be an integer >= 2, got {max_length!r}")
        return cls(vocab, merges, **tokens, model_max_length=max_length, added_tokens=added)

    @classmethod
    def from_default_vocab(
        cls, pad_token: str = EOS_TOKEN, model_max_length: int = DEFAULT_MAX_LENGTH
    ) -> CLIPTokenizer:
        """The CLIP ViT-L/14 tokenizer (SD1; pad_token="!" for SD2) from OpenAI's BPE file shipped
        with minidiff: for checkpoints that come without a tokenizer folder."""
        vocab, merges = vocab_and_merges(_DEFAULT_VOCAB)
        return cls(vocab, merges, pad_token=pad_token, model_max_length=model_max_length)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool | None = None) -> None:
        """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (transformers' layout),
        each written atomically; `overwrite` as minidiff.files.output_folder."""
        with (
            tempfile.TemporaryDirectory() as scratch,
            files.output_folder(save_directory, overwrite, "tokenizer_config.json") as out,
        ):
            # the tokenizers library writes vocab.json and merges.txt ("#version: 0.2" header) itself
            for written in self._tokenizer.model.save(scratch):
                files.write_bytes(out / Path(written).name, Path(written).read_bytes())
            self._write_configs(out)

    def _write_configs(self, out: Path) -> None:
        added = {
            str(i): {**{k: getattr(t, k) for k in _TOKEN_FLAGS}, "special": t.special}
            for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())
        }
        special = {name: getattr(self, name) for name in _SPECIAL_NAMES}
        config = {
            "added_tokens_decoder": added,  # keeps the tokens' flags (e.g. normalized) across a save
            **special,
            "model_max_length": self.model_max_length,
            "tokenizer_class": "CLIPTokenizer",
        }
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            files.write_text(out / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ vocabulary

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The BPE vocabulary alone (49408 for CLIP), like transformers."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        """id -> AddedToken for the special tokens and every token added on top of the BPE vocabulary."""
        return dict(sorted(self._tokenizer.get_added_tokens_decoder().items()))

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {t.content: i for i, t in self.added_tokens_decoder.items()}

    def add_tokens(self, tokens: Token | Sequence[Token], special_tokens: bool = False) -> int:
        """Add tokens (textual inversion's learned words) at the next free ids; returns how many were new.
        A plain string is matched after normalisation (lowercased), as transformers adds it."""
        tokens = [tokens] if isinstance(tokens, (str, AddedToken)) else list(tokens)
        if special_tokens:
            return self._tokenizer.add_special_tokens(tokens)
        return self._tokenizer.add_tokens(tokens)

    def remove_added_tokens(self, tokens: Sequence[str]) -> None:
        """Remove non-special added tokens; the later ones move down to keep the ids contiguous (as
        diffusers' unload_textual_inversion renumbers them)."""
        state = json.loads(self._tokenizer.to_str())
        specials = [t["id"] for t in state["added_tokens"] if t["special"]]
        next_id = max(specials) + 1 if specials else self.vocab_size
        kept = []
        for t in state["added_tokens"]:
            if t["content"] in tokens and not t["special"]:
                continue
            if not t["special"]:
                t["id"], next_id = next_id, next_id + 1
            kept.append(t)
        state["added_tokens"] = kept
        self._tokenizer = Tokenizer.from_str(json.dumps(state))

    bos_token_id = _token_id_property("bos_token")
    eos_token_id = _token_id_property("eos_token")
    pad_token_id = _token_id_property("pad_token")
    unk_token_id = _token_id_property("unk_token")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({self._tokenizer.token_to_id(getattr(self, n)) for n in _SPECIAL_NAMES})

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Token strings -> ids; an unknown token gives the unk id (as in transformers)."""
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False
    ) -> str | list[str]:
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            return self._tokenizer.id_to_token(self._check_ids([ids])[0])
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in self._check_ids(ids) if i not in special]

    def _check_ids(self, ids: Any) -> list[int]:
        """Plain ints in [0, len(self)): the Rust side would overflow or return nothing otherwise."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1 or ids.is_floating_point():
                raise ValueError(f"expected a 1-d integer tensor of token ids, got {ids.dim()}-d {ids.dtype}")
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            try:
                i = operator.index(i)  # ints and numpy integers; not floats or strings
            except TypeError:
                raise TypeError(f"token ids must be integers, got {type(i).__name__} {i!r:.40}") from None
            if not 0 <= i < len(self):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self)})")
            out.append(i)
        return out

    # ------------------------------------------------------------------ encoding

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of one prompt, without BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes one prompt string, got a {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | torch.Tensor:
        """The ids of ONE prompt."""
        if not isinstance(text, str):
            raise TypeError(
                f"encode takes one prompt string, got a {type(text).__name__}; call the tokenizer on batches"
            )
        encoded = self(
            text, padding=padding, max_length=max_length, truncation=truncation,
            return_tensors=return_tensors, add_special_tokens=add_special_tokens,
        )  # fmt: skip
        return encoded["input_ids"]

    def __call__(
        self,
        text: TextInput,
        text_pair: TextInput | None = None,
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool | str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
    ) -> BatchEncoding:
        """Tokenise a prompt or a batch (with `text_pair`: pairs). Lists of ints unless return_tensors="pt".

        As in transformers: max_length defaults to model_max_length when padding to "max_length" or
        truncating; a max_length alone (no padding, truncation unset) turns truncation on;
        padding=True/"longest" pads to the longest prompt of the batch. A pair is
        `BOS a EOS EOS b EOS` (RoBERTa's layout, which transformers' CLIPTokenizer uses), truncated
        longest-first. `return_offsets_mapping`: each token's (start, end) characters in its text,
        (0, 0) for special and padding tokens.
        """
        texts, batched = _check_text(text)
        pairs = None
        if text_pair is not None:
            pairs, pair_batched = _check_text(text_pair)
            if pair_batched != batched or len(pairs) != len(texts):
                raise ValueError(f"text_pair must match text: {len(texts)} text(s), {len(pairs)} pair(s)")
        pad = _padding_mode(padding)
        if max_length is not None and pad is None and truncation is None:
            truncation = True
        truncate = _truncates(truncation)
        if max_length is None and (truncate or pad == "max_length"):
            max_length = self.model_max_length
        n_special = (4 if pairs else 2) if add_special_tokens else 0
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)):
            raise TypeError(f"max_length must be an integer, got {max_length!r}")
        if truncate and max_length < n_special:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS; it must be >= {n_special}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")

        firsts = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        seconds = self._tokenizer.encode_batch(pairs, add_special_tokens=False) if pairs else [None] * len(texts)
        bos, eos = (self.bos_token_id, (0, 0)), (self.eos_token_id, (0, 0))
        rows = []  # (id, offsets) per token
        for first, second in zip(firsts, seconds, strict=True):
            a = list(zip(first.ids, first.offsets))
            b = list(zip(second.ids, second.offsets)) if second is not None else []
            if truncate:  # cut the words so the EOS stays last
                a, b = _longest_first(a, b, max_length - n_special)
            if add_special_tokens:
                rows.append([bos, *a, eos, *([eos, *b, eos] if second is not None else [])])
            else:
                rows.append(a + b)

        target = max(map(len, rows)) if pad == "longest" else max_length if pad == "max_length" else 0
        masks = [[1] * len(r) + [0] * max(target - len(r), 0) for r in rows]
        rows = [r + [(self.pad_token_id, (0, 0))] * max(target - len(r), 0) for r in rows]
        out = {"input_ids": [[i for i, _ in r] for r in rows], "attention_mask": masks}
        if return_offsets_mapping:
            out["offset_mapping"] = [[o for _, o in r] for r in rows]

        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError(
                    "the prompts have different token counts; use padding=True or padding='max_length' "
                    "(with truncation=True) to return them as one tensor"
                )
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        return BatchEncoding(out if batched else {k: v[0] for k, v in out.items()})

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        ids: int | Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Token ids -> text. `</w>` marks word ends, so it becomes a space (transformers does the same).
        `clean_up_tokenization_spaces` is accepted and changes nothing: transformers 5 skips that
        WordPiece clean-up for CLIP's BPE (it would join "a ," into "a,")."""
        text = self._tokenizer.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def batch_decode(
        self,
        sequences: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        if isinstance(sequences, torch.Tensor) and sequences.dim() != 2:
            raise ValueError(f"batch_decode expects a 2-d tensor (batch, length), got shape {tuple(sequences.shape)}")
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r})"
        )
