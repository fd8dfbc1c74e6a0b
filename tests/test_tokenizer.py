"""CLIPTokenizer parity with transformers' CLIPTokenizer, loaded from the SAME tokenizer files.

The files are derived in a fixture from the CLIP vocabulary shipped with minidiff
(weights_conversion.clip_vocab), so these tests also check that converter. The only hard-coded
ids are four known CLIP ids; everything else is compared against transformers.
"""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
import transformers

from minidiff.loading import CheckpointError
from minidiff.tokenizer import _DEFAULT_VOCAB, CLIPTokenizer
from weights_conversion.clip_vocab import NUM_MERGES, VOCAB_SIZE, bytes_to_unicode, write_hf_tokenizer_files

# transformers 5 has one (tokenizers-backed) class and CLIPTokenizerFast is an alias of it;
# where the two differ (transformers 4), both are references
REFERENCE_CLASSES = list(
    {id(c): c for c in (transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", None)) if c}.values()
)

# ---------------------------------------------------------------------------- the corpus

_HANDWRITTEN = [
    # plain SD prompts
    "a photo of a cat",
    "A photograph of an astronaut riding a horse on Mars, highly detailed, 8k, trending on artstation",
    "portrait of a woman, oil painting by Rembrandt, dramatic lighting",
    "cyberpunk city at night, neon lights, rain, reflections, cinematic",
    "a puppy",
    "Puppy",
    "PUPPY",
    "pUpPy On A sKaTeBoArD",
    "an (((extremely))) detailed [[castle]] {in the clouds}",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
    "low quality, blurry, bad anatomy, extra fingers, watermark",
    # empty and whitespace
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    " \t \n \r ",
    "\u3000",  # ideographic space
    "\u00a0",  # no-break space
    "\u2003\u2009",  # em space, thin space
    "  leading spaces",
    "trailing spaces   ",
    "many     spaces     between",
    "tabs\tbetween\t\twords",
    "new\nlines\n\nand\r\ncarriage\rreturns",
    "mixed \t\n\r\x0b\x0c whitespace",
    "no-break\u00a0space and\u202fnarrow",
    # accents, NFC vs NFD
    "café",
    unicodedata.normalize("NFD", "café"),
    "naïve résumé façade",
    unicodedata.normalize("NFD", "naïve résumé façade"),
    "Ångström Øresund Straße",
    unicodedata.normalize("NFD", "Ångström Øresund Straße"),
    "e\u0301\u0301\u0301 stacked combining marks",
    "Zoë Brontë coöperate",
    "ﬁ ligature ﬀ ﬃ",  # NFC keeps ligatures (NFKC would not)
    "Ⅻ Ⅳ roman numerals ① ② ③",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ",
    "Ǆ ǅ ǆ titlecase digraphs",
    "İstanbul ıi DİYARBAKIR",  # Turkish dotted/dotless i: lowercase grows a combining dot
    "ΑΘΗΝΑ Ελλάδα ΌΣΟΣ",  # Greek final sigma
    "Москва, Россия",
    "עברית مرحبا بالعالم",
    "हिन्दी भाषा",
    "ภาษาไทย",
    "한국어 텍스트",
    # CJK
    "東京タワーの夜景",
    "一只可爱的小猫坐在窗台上",
    "日本語とEnglishの混在",
    "ｶﾀｶﾅ halfwidth katakana",
    "𠀀𠀁 supplementary CJK",
    # emoji
    "🐱",
    "a cat 🐱 and a dog 🐶",
    "👩‍👩‍👧‍👦 family zwj sequence",
    "👍🏽 skin tone",
    "🇯🇵🇺🇸 flags",
    "❤️ heart with variation selector",
    "🔥🔥🔥🔥🔥",
    "emoji🙂glued🙃together",
    # zero-width and invisible characters
    "zero\u200bwidth\u200bspace",
    "zero\u200cwidth\u200dnon-joiner and joiner",
    "\ufeffbyte order mark",
    "soft\u00adhyphen",
    "word\u2060joiner",
    "left\u200eto\u200fright marks",
    "\u200b",
    "\u200b \u200b",
    "control\x00char\x01acters\x7f",
    "bell\x07 and escape\x1b[0m",
    # literal special tokens
    "<|endoftext|>",
    "<|startoftext|>",
    "a <|endoftext|> b",
    "a<|endoftext|>b",
    "<|startoftext|>a photo<|endoftext|>",
    "<|ENDOFTEXT|> upper case special",
    "<|EndOfText|>",
    "<|endoftext|><|endoftext|><|endoftext|>",
    "<|endoftext",
    "|endoftext|>",
    "< |endoftext| >",
    "<|startoftext|> <|startoftext|>",
    "<|unknown|> token",
    # HTML entities (kept literally: transformers does not unescape them)
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot;",
    "&#39;s &#x27;hex&#x27; &nbsp;",
    "Tom &amp;amp; Jerry",
    "<b>html</b> <i>tags</i> <br/>",
    # punctuation runs
    "!!!",
    "?!?!?!",
    "...",
    "wow!!! really??? yes...",
    "a,b,c;d:e",
    "--- *** ___ ===",
    "(((masterpiece))), [[[best quality]]]",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "“curly quotes” and ‘single’ — em dash – en dash …",
    "«guillemets» ¿question? ¡exclamation!",
    "hello!! world!",
    "!",
    "!!",
    "a!b",
    "price: $100.00 (50% off)",
    "user@example.com http://example.com/path?q=1&r=2#frag",
    "C:\\Users\\name\\file.txt",
    "snake_case_words and kebab-case-words",
    # contractions
    "it's don't won't can't",
    "we're they've I'm you'll she'd",
    "IT'S DON'T WE'RE",
    "it’s curly apostrophe",
    "'s 't 're 've 'm 'll 'd",
    "''quoted''",
    "rock 'n' roll",
    "o'clock o'neill",
    # numbers
    "1234567890",
    "3.14159",
    "1,000,000",
    "2023-12-31 23:59:59",
    "1st 2nd 3rd 4th",
    "version 1.2.3-beta",
    "٠١٢٣ arabic-indic digits",
    "½ ¾ ² ³ fractions and superscripts",
    "0x1F 0b1010 1e-5",
    "a1b2c3",
    "8k uhd 4k 1080p",
    # mixed case and long words
    "CamelCaseWord and camelCase",
    "McDonald's iPhone eBay",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 300,
    "ab" * 120,
    # over 77 tokens
    "a photo of a cat " * 20,
    ", ".join(f"tag{i}" for i in range(60)),
    " ".join(str(i) for i in range(100)),
    "🐱" * 80,
    "东京" * 60,
    "word " * 76,
    "word " * 75,
    "word " * 74,
    "<|endoftext|> " * 90,
    "!" * 200,
]


def _transformations(text: str) -> list[str]:
    """The same prompt written differently: case, decomposed accents, odd whitespace."""
    return [
        text.upper(),
        text.title(),
        unicodedata.normalize("NFD", text),
        text.replace(" ", "\t"),
        text.replace(" ", "\n"),
        "  " + text.replace(" ", "   ") + " \n",
        text.replace(" ", "\u200b"),
    ]


def _random_prompts(n: int, seed: int = 0) -> list[str]:
    """Seeded fuzz prompts mixing scripts, marks, emoji, invisibles and punctuation."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r\u00a0\u3000",
        "!?.,;:'\"()[]{}<>|/\\-_=+*&^%$#@~`",
        "áéíóúñüçøåßæœ",
        "\u0300\u0301\u0308\u0327\u030a",  # combining marks
        "αβγδλπΣΩжщыяאבגابت",
        "東京猫犬山川日本語한국어ひらがなカタカナ",
        "🐱🐶🔥❤️👍🏽👩‍👩‍👧🇯🇵✨",
        "\u200b\u200c\u200d\u2060\ufeff\u00ad",
        ["<|endoftext|>", "<|startoftext|>", "'s", "'ll", "&amp;", "..."],
    ]
    prompts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            pool = rng.choice(pools)
            parts.append(rng.choice(pool))
        prompts.append("".join(parts))
    return prompts


CORPUS: list[str] = [
    *_HANDWRITTEN,
    *[t for text in _HANDWRITTEN[:12] for t in _transformations(text)],
    *_random_prompts(120),
]
assert len(CORPUS) >= 200 and len(set(CORPUS)) > 200


# configs as real checkpoints store them; the last two are transformers 4 era SD files whose
# special tokens are AddedToken dicts with normalized=true (matched after lowercasing)
def _dict_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


CONFIG_VARIANTS = {
    "sd1": {"pad_token": "<|endoftext|>"},
    "sd2": {"pad_token": "!"},
    "sd1-legacy-addedtoken": {
        "tokenizer_config": {
            "bos_token": {"__type": "AddedToken", **_dict_token("<|startoftext|>")},
            "eos_token": {"__type": "AddedToken", **_dict_token("<|endoftext|>")},
            "unk_token": {"__type": "AddedToken", **_dict_token("<|endoftext|>")},
            "pad_token": "<|endoftext|>",
            "model_max_length": 77,
            "clean_up_tokenization_spaces": True,
        },
        "special_tokens_map": {
            "bos_token": _dict_token("<|startoftext|>"),
            "eos_token": _dict_token("<|endoftext|>"),
            "unk_token": _dict_token("<|endoftext|>"),
            "pad_token": "<|endoftext|>",
        },
    },
    "sd2-added-tokens-decoder": {
        "tokenizer_config": {
            "added_tokens_decoder": {
                "0": {**_dict_token("!"), "special": True},
                "49406": {**_dict_token("<|startoftext|>"), "special": True},
                "49407": {**_dict_token("<|endoftext|>"), "special": True},
            },
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "!",
            "model_max_length": 77,
        },
        # ignored by transformers when the config has added_tokens_decoder: a trap if read
        "special_tokens_map": {"pad_token": "<|endoftext|>"},
    },
}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tokenizer folder per config variant, all derived from the shipped OpenAI BPE file."""
    base = tmp_path_factory.mktemp("clip_tokenizers")
    sd1 = write_hf_tokenizer_files(_DEFAULT_VOCAB, base / "sd1", pad_token="<|endoftext|>")
    dirs = {"sd1": sd1, "sd2": write_hf_tokenizer_files(_DEFAULT_VOCAB, base / "sd2", pad_token="!")}
    for name, variant in CONFIG_VARIANTS.items():
        if name in dirs:
            continue
        folder = base / name
        folder.mkdir()
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(sd1 / f, folder / f)
        (folder / "tokenizer_config.json").write_text(json.dumps(variant["tokenizer_config"]))
        (folder / "special_tokens_map.json").write_text(json.dumps(variant["special_tokens_map"]))
        dirs[name] = folder
    return dirs


@pytest.fixture(scope="session", params=list(CONFIG_VARIANTS))
def pair(request: pytest.FixtureRequest, tokenizer_dirs: dict[str, Path]):
    """(minidiff tokenizer, transformers tokenizer) loaded from the same folder."""
    folder = tokenizer_dirs[request.param]
    return CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)


def _mismatches(ours: list, theirs: list, prompts: list[str]) -> list[str]:
    return [f"{p!r:.80}: {a} != {b}" for p, a, b in zip(prompts, ours, theirs) if a != b][:5]


# ---------------------------------------------------------------------------- the converter


def test_converter_writes_the_hf_clip_files(tokenizer_dirs: dict[str, Path]) -> None:
    folder = tokenizer_dirs["sd1"]
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))
    # the four known CLIP ids
    assert (vocab["puppy</w>"], vocab["cat</w>"]) == (6829, 2368)
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)
    # bytes first, then bytes with </w>, in the byte table's order
    symbols = list(bytes_to_unicode().values())
    ids = list(vocab)
    assert ids[:256] == symbols and ids[256:512] == [s + "</w>" for s in symbols]
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == NUM_MERGES + 1
    assert all(len(line.split(" ")) == 2 for line in lines[1:])
    # each merge's result is the vocabulary entry at 512 + its rank
    assert ids[512 : 512 + NUM_MERGES] == [line.replace(" ", "") for line in lines[1:]]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>"
    assert json.loads((tokenizer_dirs["sd2"] / "special_tokens_map.json").read_text())["pad_token"] == "!"


def test_converter_rejects_a_pad_token_outside_the_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pad_token"):
        write_hf_tokenizer_files(_DEFAULT_VOCAB, tmp_path, pad_token="<pad>")


def test_converter_rejects_a_file_that_is_not_gzip(tmp_path: Path) -> None:
    bad = tmp_path / "bpe.txt.gz"
    bad.write_text("not gzip")
    with pytest.raises(ValueError, match="bpe.txt.gz"):
        write_hf_tokenizer_files(bad, tmp_path / "out")


# ---------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("reference", REFERENCE_CLASSES, ids=lambda c: c.__name__)
def test_ids_padded_truncated_tensors(reference, tokenizer_dirs: dict[str, Path]) -> None:
    """The pipelines' call, on the whole corpus as one batch, for every config variant."""
    for name, folder in tokenizer_dirs.items():
        ours, theirs = CLIPTokenizer.from_pretrained(folder), reference.from_pretrained(folder)
        kwargs = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        a, b = ours(CORPUS, **kwargs), theirs(CORPUS, **kwargs)
        assert a.input_ids.dtype == b["input_ids"].dtype and a.input_ids.shape == (len(CORPUS), 77)
        assert _mismatches(a.input_ids.tolist(), b["input_ids"].tolist(), CORPUS) == [], name
        assert torch.equal(a.attention_mask, b["attention_mask"]), name


def test_ids_without_padding_or_truncation(pair) -> None:
    ours, theirs = pair
    a, b = ours(CORPUS), theirs(CORPUS)
    assert _mismatches(a.input_ids, b["input_ids"], CORPUS) == []
    assert a.attention_mask == b["attention_mask"]
    assert any(len(ids) > 77 for ids in a.input_ids)  # the corpus does exceed the context


def test_single_prompts_match_one_by_one(pair) -> None:
    """A single string (not a batch): plain lists, and (1, n) tensors with return_tensors="pt"."""
    ours, theirs = pair
    for prompt in CORPUS[::7]:
        a, b = ours(prompt), theirs(prompt)
        assert isinstance(a.input_ids, list) and a.input_ids == b.input_ids, prompt
        assert a["attention_mask"] == b.attention_mask
        assert ours.encode(prompt) == theirs.encode(prompt)
        assert ours.tokenize(prompt) == theirs.tokenize(prompt)
        pt = ours(prompt, padding="max_length", truncation=True, return_tensors="pt").input_ids
        assert torch.equal(pt, theirs(prompt, padding="max_length", truncation=True, return_tensors="pt").input_ids)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=True),
        dict(padding="longest", return_tensors="pt"),
        dict(padding="longest", truncation=True, max_length=20, return_tensors="pt"),
        dict(padding="max_length", max_length=90),  # pads the short ones, leaves the long ones
        dict(padding="max_length"),  # max_length defaults to model_max_length
        dict(truncation=True),
        dict(max_length=10),  # a max_length alone turns truncation on (transformers' rule)
        dict(truncation=True, max_length=2),
        dict(truncation=True, max_length=3),
        dict(truncation="longest_first", max_length=76),
        dict(add_special_tokens=False),
        dict(add_special_tokens=False, truncation=True, max_length=5, padding="max_length"),
        dict(padding="do_not_pad", truncation="do_not_truncate", max_length=5),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_padding_and_truncation_options(pair, kwargs: dict) -> None:
    ours, theirs = pair
    batch = CORPUS[::3]
    a, b = ours(batch, **kwargs), theirs(batch, **kwargs)
    to_list = lambda x: x.tolist() if isinstance(x, torch.Tensor) else x  # noqa: E731
    assert _mismatches(to_list(a.input_ids), to_list(b.input_ids), batch) == []
    assert to_list(a.attention_mask) == to_list(b.attention_mask)


def test_truncation_keeps_eos_last_and_pads_with_the_pad_token(pair) -> None:
    ours, theirs = pair
    ids = ours(["a photo of a cat " * 30, "a cat"], padding="max_length", truncation=True).input_ids
    assert ids[0][0] == ours.bos_token_id and ids[0][-1] == ours.eos_token_id and len(ids[0]) == 77
    assert ids[1][3] == ours.eos_token_id and ids[1][4:] == [ours.pad_token_id] * 73
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id,
    )  # fmt: skip
    assert (ours.model_max_length, ours.vocab_size, len(ours)) == (
        theirs.model_max_length,
        theirs.vocab_size,
        len(theirs),
    )


def test_decode_matches_transformers(pair) -> None:
    ours, theirs = pair
    ids = theirs(CORPUS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
    unpadded = theirs(CORPUS).input_ids
    for row in unpadded[::5]:
        assert ours.decode(row) == theirs.decode(row)
        assert ours.decode(torch.tensor(row), skip_special_tokens=True) == theirs.decode(row, skip_special_tokens=True)
        assert ours.convert_ids_to_tokens(row) == theirs.convert_ids_to_tokens(row)
        tokens = theirs.convert_ids_to_tokens(row)
        assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_ids_to_tokens(2368) == theirs.convert_ids_to_tokens(2368)
    assert ours.convert_tokens_to_ids("no-such-token") == theirs.convert_tokens_to_ids("no-such-token")


def test_decode_round_trips(pair) -> None:
    ours, _ = pair
    for text in ["a photo of a cat", "an astronaut riding a horse on mars", "portrait of a woman by rembrandt"]:
        ids = ours(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == text
        assert ours(ours.decode(ids, skip_special_tokens=True)).input_ids == ids
    for text in CORPUS:  # decoding and encoding again is stable on the content ids
        ids = ours(text, add_special_tokens=False).input_ids
        again = ours(ours.decode(ids), add_special_tokens=False).input_ids
        assert ours.decode(again) == ours.decode(ids), text


def test_default_vocab_equals_the_derived_folder(tokenizer_dirs: dict[str, Path]) -> None:
    for pad, folder in (("<|endoftext|>", "sd1"), ("!", "sd2")):
        shipped = CLIPTokenizer.from_default_vocab(pad_token=pad)
        loaded = CLIPTokenizer.from_pretrained(tokenizer_dirs[folder])
        kwargs = dict(padding="max_length", truncation=True, return_tensors="pt")
        assert torch.equal(shipped(CORPUS, **kwargs).input_ids, loaded(CORPUS, **kwargs).input_ids)
        assert shipped.pad_token == pad and shipped.get_vocab() == loaded.get_vocab()


def test_kwargs_override_the_files(tokenizer_dirs: dict[str, Path]) -> None:
    sd2_from_sd1 = CLIPTokenizer.from_pretrained(tokenizer_dirs["sd1"], pad_token="!", model_max_length=64)
    reference = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs["sd1"], pad_token="!", model_max_length=64)
    assert sd2_from_sd1.pad_token_id == reference.pad_token_id == 0 and sd2_from_sd1.model_max_length == 64
    kwargs = dict(padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(sd2_from_sd1(CORPUS, **kwargs).input_ids, reference(CORPUS, **kwargs).input_ids)


# ---------------------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("variant", ["sd2", "sd1-legacy-addedtoken"])
def test_save_pretrained_loads_in_transformers_and_back(
    variant: str, tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    original = CLIPTokenizer.from_pretrained(tokenizer_dirs[variant])
    original.save_pretrained(tmp_path)
    reference = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs[variant])
    kwargs = dict(padding="max_length", truncation=True, return_tensors="pt")
    expected = reference(CORPUS, **kwargs).input_ids
    assert torch.equal(transformers.CLIPTokenizer.from_pretrained(tmp_path)(CORPUS, **kwargs).input_ids, expected)
    assert torch.equal(CLIPTokenizer.from_pretrained(tmp_path)(CORPUS, **kwargs).input_ids, expected)


def _hub_cache(root: Path, source: Path, repo: str = "owner/name", commit: str = "0123456789" * 4) -> Path:
    """A Hugging Face cache holding `repo` at one commit, as huggingface_hub lays it out."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo_dir / "snapshots" / commit / "tokenizer")
    return root


def test_hub_id_loads_offline_from_the_cache(
    tokenizer_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hub_constants

    cache = _hub_cache(tmp_path / "hub", tokenizer_dirs["sd2"])
    # huggingface_hub reads the variables at import time: patch both the environment and its constants
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "owner/name" must not be mistaken for a local folder

    from_hub = CLIPTokenizer.from_pretrained("owner/name", subfolder="tokenizer")
    local = CLIPTokenizer.from_pretrained(tokenizer_dirs["sd2"])
    assert from_hub.pad_token == "!"
    assert from_hub(CORPUS, padding=True).input_ids == local(CORPUS, padding=True).input_ids
    with pytest.raises(FileNotFoundError, match="other/repo"):
        CLIPTokenizer.from_pretrained("other/repo", subfolder="tokenizer")


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def sd1(tokenizer_dirs: dict[str, Path]) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dirs["sd1"])


@pytest.mark.parametrize(
    "prompt, message",
    [
        (3, "int"),
        (None, "NoneType"),
        (["a cat", 3], "prompt 1 .*int"),
        ([["a", "b"]], "prompt 0 .*list"),
        (b"bytes", "bytes"),
    ],
)
def test_non_string_prompts_raise_type_error(sd1: CLIPTokenizer, prompt, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        sd1(prompt)


def test_other_bad_call_arguments(sd1: CLIPTokenizer) -> None:
    with pytest.raises(TypeError, match="one prompt string"):
        sd1.encode(["a", "b"])
    with pytest.raises(TypeError, match="one prompt string"):
        sd1.tokenize(5)
    with pytest.raises(ValueError, match="empty"):
        sd1([])
    with pytest.raises(ValueError, match="padding"):
        sd1("a", padding="everything")
    with pytest.raises(ValueError, match="return_tensors"):
        sd1("a", return_tensors="tf")
    with pytest.raises(ValueError, match="no room for BOS and EOS"):
        sd1("a cat", truncation=True, max_length=1)
    with pytest.raises(ValueError, match="padding=True"):  # ragged batch as one tensor
        sd1(["a", "a photo of a cat"], return_tensors="pt")


def test_out_of_vocabulary_ids_raise_value_error(sd1: CLIPTokenizer) -> None:
    for bad in ([49408], [-1], [320, 10**12], torch.tensor([1, 49408])):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sd1.decode(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sd1.batch_decode([[320], [99999]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sd1.convert_ids_to_tokens(49408)
    with pytest.raises(TypeError, match="integers"):
        sd1.decode([1.5])


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_folder_without_vocab_files_names_the_file(
    missing: str, tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    shutil.copytree(tokenizer_dirs["sd1"], tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")


def test_corrupt_vocab_file_is_a_clear_error(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(tokenizer_dirs["sd1"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_tokenizer_json_only_folder(kind: str, tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    """transformers 5 saves a tokenizer as tokenizer.json alone: the same ids must come out."""
    theirs = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs[kind])
    theirs.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    kwargs = dict(padding="max_length", max_length=77, truncation=True)
    assert ours(CORPUS, **kwargs).input_ids == theirs(CORPUS, **kwargs).input_ids


def test_folder_with_no_tokenizer_files_at_all(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
