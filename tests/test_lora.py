"""LoRA files in every supported format, written by the test, loaded into diffusers (with peft) and minidiff.

A tiny SD1-style pipeline (every weight perturbed) is saved once and loaded by both libraries. Each
LoRA covers every Linear and Conv2d of the UNet (attention, feed-forward, projections, and as LoCon
the ResNet, down/upsampling and in/out convs) and of the text encoder, with random non-zero down AND
up weights, ranks that differ per layer and alphas that differ from the ranks. The UNet output, the
text embeddings and a seeded 2-step image must agree (3e-4 on [0, 1]) with one adapter, two weighted
adapters, scale 0.5, fused and unfused; after unload_lora_weights the image is the base image exactly.
"""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import rel_err, save_tiny_sd
from safetensors.torch import save_file
from torch import nn

import minidiff
from minidiff import lora as lora_layers

TOL = 3e-4
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("lora") / "sd1", "sd1")


@pytest.fixture(scope="module")
def our_pipe(folder):
    return minidiff.StableDiffusionPipeline.from_pretrained(folder)


@pytest.fixture
def pipes(folder, our_pipe):
    """A fresh diffusers pipeline per test (peft leaves state behind across adapter names); minidiff's is
    shared, and each test checks that unloading gives its base model back."""
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    for p in (theirs, our_pipe):
        p.set_progress_bar_config(disable=True)
    return theirs, our_pipe


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def random_lora(
    pipe, seed: int, alpha: float | None = None, components=("unet", "text_encoder")
) -> dict[tuple[str, str], tuple]:
    """{(component, diffusers module): (down, up, alpha)} over every layer; alpha=None: per-layer alphas."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component in components:
        model = getattr(pipe, component)
        for i, name in enumerate(layer_names(model)):
            layer = model.get_submodule(name)
            rank = (2, 3, 4)[(i + seed) % 3]
            if isinstance(layer, nn.Conv2d):
                down_shape = (rank, layer.in_channels, *layer.kernel_size)
                up_shape = (layer.out_channels, rank, 1, 1)
            else:
                down_shape, up_shape = (rank, layer.in_features), (layer.out_features, rank)
            fan_in = int(np.prod(down_shape[1:]))
            down = torch.randn(down_shape, generator=g) / fan_in**0.5
            up = torch.randn(up_shape, generator=g) * 0.3 / rank**0.5
            out[component, name] = (down, up, alpha if alpha is not None else (1.0, 3.0, 6.0)[(i + 2 * seed) % 3])
    return out


def write_peft(lora: dict, path) -> None:
    """diffusers' save_lora_weights layout: prefixed lora_A/lora_B, LoraConfig values in the header."""
    tensors, config = {}, {}
    for (component, name), (down, up, alpha) in lora.items():
        tensors[f"{component}.{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{component}.{name}.lora_B.weight"] = up.contiguous()
        c = config.setdefault(
            component, {"r": 4, "lora_alpha": 4, "rank_pattern": {}, "alpha_pattern": {}, "target_modules": []}
        )
        c["rank_pattern"][name] = down.shape[0]
        c["alpha_pattern"][name] = alpha
        c["target_modules"].append(name)
    header = {f"{component}.{k}": v for component, c in config.items() for k, v in c.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def write_kohya(lora: dict, path, rename=lambda c, n: n, prefixes=KOHYA_PREFIXES) -> None:
    tensors = {}
    for (component, name), (down, up, alpha) in lora.items():
        key = prefixes[component] + rename(component, name).replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


# the tiny UNet's diffusers block paths in the original LDM numbering (2 levels, 1 ResNet per level)
LDM_BLOCKS = {
    "conv_in": "input_blocks.0.0",
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.attentions.0": "input_blocks.1.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "up_blocks.1.attentions.0": "output_blocks.2.1",
    "up_blocks.1.resnets.1": "output_blocks.3.0",
    "up_blocks.1.attentions.1": "output_blocks.3.1",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_out": "out.2",
}
LDM_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def ldm_name(component: str, name: str) -> str:
    if component != "unet":
        return name
    for block, ldm in LDM_BLOCKS.items():
        if name == block or name.startswith(block + "."):
            rest = name[len(block) :]
            if ".resnets." in block:
                rest = "." + LDM_RESNET[rest[1:]]
            return ldm + rest
    raise AssertionError(name)


def write_attn_procs(lora: dict, path, prefixed: bool = True) -> None:
    """diffusers' attention-processor LoRA files (a pickle): the attention projections as to_q_lora.down /
    .up; the first ones (save_attn_procs) held the UNet alone, unprefixed."""
    procs = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    procs |= {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    tensors = {}
    for (component, name), (down, up, _) in lora.items():
        module, _, proj = name.rpartition(".to_out.0" if name.endswith("to_out.0") else ".")
        proj = proj or "to_out.0"
        if not module.endswith(("attn1", "attn2", "self_attn")) or (component != "unet" and not prefixed):
            continue
        processor = ".processor" if component == "unet" else ""
        key = f"{component}.{module}" if prefixed else module
        tensors[f"{key}{processor}.{procs[proj]}.down.weight"] = down
        tensors[f"{key}{processor}.{procs[proj]}.up.weight"] = up
    torch.save(tensors, path)


def outputs(pipe, **call) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        unet = pipe.unet(latents, 500, encoder_hidden_states=text).sample
    image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np", **call)
    return {"text": text, "unet": unet, "image": torch.from_numpy(image.images)}


def assert_same(theirs, ours, what: str, **call) -> dict:
    a, b = outputs(theirs, **call), outputs(ours, **call)
    assert rel_err(b["text"], a["text"]) < 1e-4, f"{what}: text embeddings"
    assert rel_err(b["unet"], a["unet"]) < 1e-4, f"{what}: UNet output"
    assert (b["image"] - a["image"]).abs().max() < TOL, f"{what}: image"
    return b


def assert_changed(base: dict, now: dict) -> None:
    for key in ("text", "unet"):
        assert rel_err(now[key], base[key]) > 1e-2, f"the LoRA does not change the {key} output"


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_matches_diffusers(pipes, tmp_path, fmt):
    theirs, ours = pipes
    base = outputs(ours)
    write = write_peft if fmt == "peft" else write_kohya
    alpha = None if fmt == "peft" else 3.0  # diffusers reads one alpha for all attention layers of a kohya file
    write(random_lora(theirs, 1, alpha), tmp_path / "a.safetensors")
    write(random_lora(theirs, 2, alpha), tmp_path / "b.safetensors")
    try:
        for p in pipes:
            p.load_lora_weights(tmp_path / "a.safetensors", adapter_name="a")
        assert_changed(base, assert_same(theirs, ours, "one adapter"))
        for p in pipes:
            p.load_lora_weights(tmp_path / "b.safetensors", adapter_name="b")
        assert ours.get_active_adapters() == theirs.get_active_adapters()
        assert_same(theirs, ours, "two adapters, loaded")
        for p in pipes:
            p.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
        assert ours.get_active_adapters() == ["a", "b"]
        weighted = assert_same(theirs, ours, "two adapters, weighted")
        half = assert_same(theirs, ours, "scale 0.5", cross_attention_kwargs={"scale": 0.5})
        assert rel_err(half["image"], weighted["image"]) > 1e-3, "cross_attention_kwargs' scale changes nothing"
        before = {k: v.clone() for k, v in [*ours.unet.state_dict().items(), *ours.text_encoder.state_dict().items()]}
        for p in pipes:
            p.fuse_lora(lora_scale=0.8)
        assert_same(theirs, ours, "fused")
        for p in pipes:
            p.unfuse_lora()
        after = dict([*ours.unet.state_dict().items(), *ours.text_encoder.state_dict().items()])
        assert all(torch.equal(before[k], v) for k, v in after.items()), "unfuse does not restore the weights exactly"
        # minidiff's unfuse also restores the adapters' scale; diffusers keeps them scaled by fuse_lora's
        # lora_scale (peft's scale_layer is not undone), so it is brought back with set_adapters
        unfused = outputs(ours)
        assert all(rel_err(unfused[k], weighted[k]) < 1e-5 for k in unfused), "unfused differs from before fuse_lora"
        for p in pipes:
            p.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
        assert_same(theirs, ours, "unfused")
        for p in pipes:
            p.disable_lora()
        assert all(torch.equal(v, base[k]) for k, v in outputs(ours).items()), "disable_lora leaves an adapter on"
        assert_same(theirs, ours, "disabled")
        for p in pipes:
            p.enable_lora()
        assert_same(theirs, ours, "enabled again (weights kept)")
        for p in pipes:
            p.set_adapters("b")
        assert_same(theirs, ours, "adapter b alone")
        for p in pipes:
            p.delete_adapters("b")
        assert ours.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    finally:
        for p in pipes:
            p.unload_lora_weights()
    after = outputs(ours)
    assert all(torch.equal(after[k], base[k]) for k in base), "unload_lora_weights does not give the base model back"
    assert not list(lora_layers.lora_layers(ours.unet))


@torch.no_grad()
def test_kohya_per_module_alphas_are_kohyas_maths(folder, our_pipe, tmp_path):
    """A kohya file whose alphas differ from module to module: each layer gets W + alpha / rank * up @ down,
    the definition kohya-ss and A1111 apply (checked against a diffusers copy with the deltas merged by hand;
    diffusers 0.42's own kohya loader gives other numbers for such files, see the README)."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    lora = random_lora(ref, 1, alpha=None)
    assert len({alpha for _, _, alpha in lora.values()}) > 1
    write_kohya(lora, tmp_path / "k.safetensors")
    for (component, name), (down, up, alpha) in lora.items():
        layer = getattr(ref, component).get_submodule(name)
        if down.ndim == 4:  # LoCon: a kxk conv to the rank, then a 1x1 conv back
            delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            delta = up @ down
        layer.weight += alpha / down.shape[0] * delta.reshape(layer.weight.shape)
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    base = our_pipe.text_encoder(ids)[0]
    our_pipe.load_lora_weights(tmp_path / "k.safetensors", adapter_name="k")
    try:
        te = our_pipe.text_encoder(ids)[0]
        assert rel_err(te, ref.text_encoder(ids)[0]) < 1e-5 and rel_err(te, base) > 1e-2
        ctx = ref.text_encoder(ids)[0]
        assert rel_err(our_pipe.unet(x, 10, encoder_hidden_states=ctx).sample, ref.unet(x, 10, ctx).sample) < 1e-5
    finally:
        our_pipe.unload_lora_weights()


def test_kohya_ldm_names_load_like_diffusers_names(pipes, tmp_path):
    """kohya files with the original LDM module paths (lora_unet_input_blocks_1_1_…) are the same LoRA."""
    theirs, ours = pipes
    lora = random_lora(theirs, 3, alpha=2.0)
    write_kohya(lora, tmp_path / "diffusers_names.safetensors")
    write_kohya(lora, tmp_path / "ldm_names.safetensors", rename=ldm_name)
    try:
        theirs.load_lora_weights(tmp_path / "diffusers_names.safetensors")
        ours.load_lora_weights(tmp_path / "ldm_names.safetensors")
        assert_same(theirs, ours, "LDM names")
    finally:
        for p in pipes:
            p.unload_lora_weights()


def test_attention_processor_pickles_match_diffusers(pipes, tmp_path):
    theirs, ours = pipes
    lora = random_lora(theirs, 4)
    write_attn_procs(lora, tmp_path / "both.bin")
    unet_only = {k: v for k, v in lora.items() if k[0] == "unet"}
    write_attn_procs(unet_only, tmp_path / "unet.bin")
    (tmp_path / "first").mkdir()
    write_attn_procs(unet_only, tmp_path / "first" / "pytorch_lora_weights.bin", prefixed=False)
    try:
        for p in pipes:
            p.load_lora_weights(tmp_path / "both.bin")
        assert_same(theirs, ours, "attention processors, UNet and text encoder")
        for p in pipes:
            p.unload_lora_weights()
        # diffusers 0.42 skips an unprefixed file (no 'unet.' keys); minidiff reads it as the UNet's
        theirs.load_lora_weights(tmp_path / "unet.bin")
        ours.load_lora_weights(tmp_path / "first")  # a folder: pytorch_lora_weights.bin found by name
        assert_same(theirs, ours, "attention processors, unprefixed")
    finally:
        for p in pipes:
            p.unload_lora_weights()


def test_state_dict_keys_unchanged_while_loaded(pipes, tmp_path):
    theirs, ours = pipes
    keys = list(ours.unet.state_dict())
    write_kohya(random_lora(theirs, 5, alpha=1.0), tmp_path / "l.safetensors")
    ours.load_lora_weights(tmp_path / "l.safetensors")
    try:
        assert list(ours.unet.state_dict()) == keys
    finally:
        ours.unload_lora_weights()


def conv_in_lora(kohya: bool) -> dict:
    """A valid LoRA on the tiny UNet's conv_in (4 -> 32 channels, 3x3): read first, must not be applied."""
    down, up = torch.ones(2, 4, 3, 3), torch.ones(32, 2, 1, 1)
    if kohya:
        return {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}
    return {"unet.conv_in.lora_A.weight": down, "unet.conv_in.lora_B.weight": up}


BAD = {
    "LoHa": (True, {"lora_unet_conv_out.hada_w1_a": torch.ones(2, 2)}, "kohya-ss.*hada_w1_a"),
    "LoKr": (True, {"lora_unet_conv_out.lokr_w1": torch.ones(2, 2)}, "kohya-ss.*lokr_w1"),
    "missing module": (
        True,
        {
            "lora_unet_down_blocks_9_conv1.lora_down.weight": torch.ones(2, 4),
            "lora_unet_down_blocks_9_conv1.lora_up.weight": torch.ones(4, 2),
        },
        "kohya-ss.*down_blocks_9_conv1.*does not have",
    ),
    "DoRA": (False, {"unet.conv_in.lora_magnitude_vector": torch.ones(32)}, r"diffusers/PEFT.*lora_magnitude_vector"),
    "LoRA bias": (False, {"unet.conv_in.lora_B.bias": torch.ones(32)}, "lora_B.bias"),
    "no up": (False, {"unet.conv_out.lora_A.weight": torch.ones(2, 32, 3, 3)}, "no matching up"),
    "wrong shape": (
        False,
        {"unet.conv_out.lora_A.weight": torch.ones(2, 32), "unet.conv_out.lora_B.weight": torch.ones(4, 2)},
        "do not fit",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_keys_are_refused_and_nothing_is_applied(our_pipe, case):
    kohya, bad, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        our_pipe.load_lora_weights({**conv_in_lora(kohya), **bad})
    assert not list(lora_layers.lora_layers(our_pipe.unet)) and not our_pipe.get_list_adapters()


def test_unknown_format_is_refused(our_pipe):
    with pytest.raises(ValueError, match="unknown file format"):
        our_pipe.load_lora_weights({"something.else": torch.ones(1)})


def test_malicious_pickle_is_not_run(our_pipe, tmp_path):
    ours = our_pipe
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"lora_unet_conv_in.lora_down.weight": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="weights_only"):
        ours.load_lora_weights(tmp_path / "evil.bin")
    assert not marker.exists()


def test_cli_lora_and_embedding_flags_equal_the_api(folder, our_pipe, tmp_path):
    """minidiff generate --lora FILE[:SCALE] … --embedding FILE[:TOKEN] gives the Python API's image."""
    from PIL import Image

    from minidiff.cli import main

    write_kohya(random_lora(our_pipe_as_diffusers_names(folder), 6, alpha=2.0), tmp_path / "a.safetensors")
    write_peft(random_lora(our_pipe_as_diffusers_names(folder), 7), tmp_path / "b.safetensors")
    torch.save({"<tok>": torch.randn(2, 32, generator=torch.Generator().manual_seed(8))}, tmp_path / "emb.bin")
    out = tmp_path / "cli.png"
    argv = ["generate", "a <mine> cat", "--model", str(folder), "--steps", "2", "--seed", "3", "--output", str(out)]
    argv += ["--lora", f"{tmp_path / 'a.safetensors'}:0.6", "--lora", str(tmp_path / "b.safetensors")]
    argv += ["--embedding", f"{tmp_path / 'emb.bin'}:<mine>"]
    assert main(argv) == 0
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "a.safetensors", adapter_name="x")
    pipe.load_lora_weights(tmp_path / "b.safetensors", adapter_name="y")
    pipe.set_adapters(["x", "y"], [0.6, 1.0])
    pipe.load_textual_inversion(tmp_path / "emb.bin", token="<mine>")
    expected = pipe(
        "a <mine> cat", num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(3)
    )
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected.images[0]))
    with pytest.raises(SystemExit, match="scale after ':' must be a number"):
        main(argv[:-4] + ["--lora", f"{tmp_path / 'a.safetensors'}:big"])
    with pytest.raises(SystemExit, match="no such file"):
        main(argv[:-4] + ["--embedding", str(tmp_path / "missing.pt")])


def our_pipe_as_diffusers_names(folder):
    """The diffusers UNet / text encoder (module names only) the LoRA files are written for."""
    return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


# ------------------------------------------------------------------ SDXL

# the tiny SDXL UNet of test_sdxl_pipelines in LDM numbering (levels: plain, then 2-layer transformers)
SDXL_LDM_BLOCKS = {
    "conv_in": "input_blocks.0.0",
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
    "down_blocks.1.resnets.0": "input_blocks.3.0",
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0",
    "up_blocks.1.resnets.1": "output_blocks.3.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}


def sdxl_ldm_name(component: str, name: str) -> str:
    if component != "unet":
        return name
    for block, ldm in SDXL_LDM_BLOCKS.items():
        if name == block or name.startswith(block + "."):
            rest = name[len(block) :]
            return ldm + ("." + LDM_RESNET[rest[1:]] if ".resnets." in block else rest)
    raise AssertionError(name)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from test_sdxl_pipelines import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("lora-sdxl") / "base", "base")


def sdxl_image(pipe, **call) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **call)
    return torch.from_numpy(out.images)


def test_sdxl_lora_matches_diffusers(sdxl_folder, tmp_path):
    """PEFT files on the UNet and both text encoders (text_projection included); kohya files with the
    LDM UNet paths and lora_te1_ / lora_te2_, both libraries reading the same files."""
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ours = minidiff.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    base = sdxl_image(ours)
    components = ("unet", "text_encoder", "text_encoder_2")
    write_peft(random_lora(theirs, 1, components=components), tmp_path / "peft.safetensors")
    kohya = random_lora(theirs, 2, alpha=3.0, components=components)
    write_kohya(kohya, tmp_path / "kohya.safetensors", sdxl_ldm_name, SDXL_KOHYA_PREFIXES)
    try:
        for p in (theirs, ours):
            p.load_lora_weights(tmp_path / "peft.safetensors", adapter_name="a")
        one = sdxl_image(ours)
        assert (one - sdxl_image(theirs)).abs().max() < TOL and (one - base).abs().max() > 1e-2
        half = dict(cross_attention_kwargs={"scale": 0.5})
        assert (sdxl_image(ours, **half) - sdxl_image(theirs, **half)).abs().max() < TOL
        for p in (theirs, ours):
            p.load_lora_weights(tmp_path / "kohya.safetensors", adapter_name="b")
        for p in (theirs, ours):
            p.set_adapters(["a", "b"], [0.5, 0.8])
        assert (sdxl_image(ours) - sdxl_image(theirs)).abs().max() < TOL
        for p in (theirs, ours):
            p.fuse_lora(components=components, lora_scale=0.7)
        assert (sdxl_image(ours) - sdxl_image(theirs)).abs().max() < TOL
        ours.unfuse_lora(components=components)
    finally:
        ours.unload_lora_weights()
    assert torch.equal(sdxl_image(ours), base)


def test_peft_alpha_keys_equal_header_alphas(pipes, tmp_path):
    """A PEFT file may carry its alphas as `{module}.alpha` tensors instead of diffusers' header."""
    theirs, ours = pipes
    lora = random_lora(theirs, 9)
    write_peft(lora, tmp_path / "header.safetensors")
    tensors = {}
    for (component, name), (down, up, alpha) in lora.items():
        tensors |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up}
        tensors[f"{component}.{name}.alpha"] = torch.tensor(alpha)
    results = []
    for source in (tmp_path / "header.safetensors", tensors):
        ours.load_lora_weights(source)
        results.append(outputs(ours))
        ours.unload_lora_weights()
    assert all(rel_err(results[0][k], results[1][k]) < 1e-6 for k in results[0])


def test_hub_ids_and_weight_name(pipes, tmp_path, hub_cache):
    """A Hub repo (offline cache): pytorch_lora_weights.safetensors by default, another file by weight_name;
    the same adapters as the local file."""
    theirs, ours = pipes
    repo = tmp_path / "repo"
    repo.mkdir()
    write_kohya(random_lora(theirs, 10, alpha=2.0), repo / "pytorch_lora_weights.safetensors")
    write_peft(random_lora(theirs, 11), repo / "other.safetensors")
    hub_cache("someone/lora", repo)
    results = []
    for first, second in (
        (("someone/lora",), ("someone/lora", "other.safetensors")),
        ((repo / "pytorch_lora_weights.safetensors",), (repo / "other.safetensors", None)),
    ):
        ours.load_lora_weights(*first, adapter_name="a")
        ours.load_lora_weights(second[0], adapter_name="b", weight_name=second[1])
        ours.set_adapters(["a", "b"], [0.5, 0.5])
        results.append(outputs(ours))
        ours.unload_lora_weights()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
