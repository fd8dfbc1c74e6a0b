"""Textual-inversion embeddings in every supported format, written by the test, loaded into diffusers and
minidiff: the same added tokens and ids, the same text embeddings and the same seeded images; compel's
DiffusersTextualInversionManager on a minidiff pipeline; unload gives the base pipeline back."""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import rel_err, save_tiny_sd
from safetensors.torch import save_file

import minidiff

TOL = 3e-4
WIDTH = 32  # the tiny text encoder's hidden size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("ti") / "sd1", "sd1")


@pytest.fixture
def pipes(folder):
    """Fresh pipelines per test: loading embeddings changes the tokenizer and the text encoder."""
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    ours = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    return theirs, ours


def vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path, token: str, emb: torch.Tensor) -> None:
    """stable-diffusion-webui's embedding .pt (its extra entries included)."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": token, "step": 3000}
    torch.save(data | {"sd_checkpoint": "a1b2c3", "sd_checkpoint_name": "v1-5"}, path)


FORMATS = {
    # name: (write(path, token, emb), file name, token passed to load_textual_inversion)
    "a1111 .pt": (write_a1111_pt, "emb.pt", None),
    "a1111 .safetensors": (lambda p, t, e: save_file({"emb_params": e}, str(p)), "emb.safetensors", "<tok>"),
    "diffusers .bin": (lambda p, t, e: torch.save({t: e[0] if len(e) == 1 else e}, p), "learned_embeds.bin", None),
    "diffusers .safetensors": (lambda p, t, e: save_file({t: e}, str(p)), "learned_embeds.safetensors", None),
}


def embed(pipe, prompt: str) -> torch.Tensor:
    prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def image(pipe, prompt: str, **kwargs) -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("n_vectors", [1, 3])
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_matches_diffusers(pipes, tmp_path, fmt, n_vectors):
    theirs, ours = pipes
    write, name, token = FORMATS[fmt]
    write(tmp_path / name, "<tok>", vectors(n_vectors, 1))
    source = tmp_path / name if name.startswith("emb") else tmp_path  # diffusers' file names: a folder
    base = embed(ours, "a <tok> photo")
    for p in pipes:
        p.load_textual_inversion(source, token=token)
    assert ours.tokenizer.added_tokens_encoder == theirs.tokenizer.added_tokens_encoder
    assert ours.maybe_convert_prompt("a <tok> photo", ours.tokenizer) == theirs.maybe_convert_prompt(
        "a <tok> photo", theirs.tokenizer
    )
    a, b = embed(theirs, "a <tok> photo"), embed(ours, "a <tok> photo")
    assert rel_err(b, a) < 1e-5 and rel_err(b, base) > 1e-2
    # the pipelines expand a multi-vector token in encode_prompt, for the prompt and the negative prompt
    a = image(ours, "a <tok> photo", negative_prompt="no <tok>")
    assert (a - image(theirs, "a <tok> photo", negative_prompt="no <tok>")).abs().max() < TOL


def test_tensor_list_and_unload(pipes):
    theirs, ours = pipes
    base_image = image(ours, "a <a> and <b>")
    base_vocab = len(ours.tokenizer)
    for p in pipes:
        p.load_textual_inversion([vectors(1, 2)[0], {"<b>": vectors(2, 3)}], token=["<a>", None])
        p.load_textual_inversion(vectors(1, 4), token="<c>")
    assert ours.tokenizer.added_tokens_encoder == theirs.tokenizer.added_tokens_encoder
    for prompt in ("a <a> and <b>", "<c>, <b> <a>"):
        assert rel_err(embed(ours, prompt), embed(theirs, prompt)) < 1e-5
    for p in pipes:
        p.unload_textual_inversion("<a>")
    assert ours.tokenizer.added_tokens_encoder == theirs.tokenizer.added_tokens_encoder
    assert rel_err(embed(ours, "<c>, <b> <a>"), embed(theirs, "<c>, <b> <a>")) < 1e-5
    for p in pipes:
        p.unload_textual_inversion()
    assert len(ours.tokenizer) == base_vocab == ours.text_encoder.get_input_embeddings().weight.shape[0]
    assert torch.equal(image(ours, "a <a> and <b>"), base_image)


def test_compel_manager_works_on_a_minidiff_pipeline(pipes):
    compel = pytest.importorskip("compel")
    out = []
    for p in pipes:
        p.load_textual_inversion(vectors(3, 5), token=["<x>", "<y>", "<z>"])
        p.load_textual_inversion({"<multi>": vectors(2, 6)})
        manager = compel.DiffusersTextualInversionManager(p)
        c = compel.Compel(tokenizer=p.tokenizer, text_encoder=p.text_encoder, textual_inversion_manager=manager)
        with torch.no_grad():
            out.append(c("a (<x> <multi>)1.3 photo of <z>"))
    assert rel_err(out[1], out[0]) < 1e-5


@pytest.mark.parametrize(
    "source, token, message",
    [
        ({"a": torch.ones(WIDTH), "b": torch.ones(WIDTH)}, None, "unknown embedding file"),
        ({"<t>": torch.ones(WIDTH + 1)}, None, "width"),
        (torch.ones(WIDTH), None, "needs its token"),
        ({"clip_l": torch.ones(1, WIDTH), "clip_g": torch.ones(1, 64)}, None, "SDXL"),
        ({"<|endoftext|>": torch.ones(WIDTH)}, None, "already in the tokenizer"),
    ],
)
def test_bad_embeddings_are_refused(folder, source, token, message):
    ours = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    vocab = len(ours.tokenizer)
    with pytest.raises(ValueError, match=message):
        ours.load_textual_inversion(source, token=token)
    assert len(ours.tokenizer) == vocab == ours.text_encoder.get_input_embeddings().weight.shape[0]


def test_malicious_pickle_is_not_run(folder, tmp_path):
    ours = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"string_to_param": {"*": Evil()}, "name": "<evil>"}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        ours.load_textual_inversion(tmp_path / "evil.pt")
    assert not marker.exists()


def test_sdxl_embedding_into_both_encoders(tmp_path_factory):
    """An SDXL embedding file ({"clip_l", "clip_g"}) loaded part by part with explicit tokenizer and text
    encoder, as diffusers' docs do; minidiff also takes the whole file and picks the part by encoder."""
    from test_sdxl_pipelines import save_tiny_sdxl

    folder = save_tiny_sdxl(tmp_path_factory.mktemp("ti-sdxl") / "base", "base")
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ours = minidiff.StableDiffusionXLPipeline.from_pretrained(folder)
    file = {"clip_l": vectors(1, 7), "clip_g": vectors(1, 8)}
    multi = {"clip_l": vectors(3, 9), "clip_g": vectors(3, 10)}
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
        for data, token in ((file, "<s>"), (multi, "<m>")):
            p.load_textual_inversion(data["clip_l"], token=token, text_encoder=p.text_encoder, tokenizer=p.tokenizer)
            p.load_textual_inversion(
                data["clip_g"], token=token, text_encoder=p.text_encoder_2, tokenizer=p.tokenizer_2
            )
    for tok in ("tokenizer", "tokenizer_2"):
        assert getattr(ours, tok).added_tokens_encoder == getattr(theirs, tok).added_tokens_encoder
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        views = [(getattr(p, enc), getattr(p, tok)) for p in (theirs, ours)]
        embeds = []
        for (encoder, tokenizer), p in zip(views, (theirs, ours)):
            prompt = p.maybe_convert_prompt("a <m> <s> photo", tokenizer)
            ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
            with torch.no_grad():
                embeds.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
        assert rel_err(embeds[1], embeds[0]) < 1e-5, enc
    assert (image(ours, "a <s> photo") - image(theirs, "a <s> photo")).abs().max() < TOL
    a = image(ours, "a <m> photo", negative_prompt="<m>, <s>")
    assert (a - image(theirs, "a <m> photo", negative_prompt="<m>, <s>")).abs().max() < TOL
    # the whole file given to the second encoder: its clip_g part
    whole = minidiff.StableDiffusionXLPipeline.from_pretrained(folder)
    whole.load_textual_inversion(file, token="<s>", text_encoder=whole.text_encoder_2, tokenizer=whole.tokenizer_2)
    row = whole.tokenizer_2.convert_tokens_to_ids("<s>")
    assert torch.equal(whole.text_encoder_2.get_input_embeddings().weight[row], file["clip_g"][0])
