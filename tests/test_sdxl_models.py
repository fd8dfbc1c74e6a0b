"""SDXL's models against diffusers / transformers: the UNet with `text_time` added conditioning (base and
refiner) at tiny configs, at reduced-width configs with the real depth, and once at the real base size;
CLIPTextModelWithProjection (text_encoder_2) at tiny and real size. Every weight perturbed, saved in the
real on-disk layout, loaded through minidiff's from_pretrained."""

from __future__ import annotations

import ctypes
import gc
import json
import re
import shutil
import sys

import diffusers
import pytest
import torch
import transformers
from conftest import perturb, reference_config, rel_err
from safetensors.torch import load_file, save_file

from minidiff import CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel, lora
from minidiff.compare import assert_same_outputs
from minidiff.loading import read_state_dict
from weights_conversion import ConversionError, convert

# ---------------------------------------------------------------- UNet configs

# SDXL's layout: no attention in the first level, per-level transformer depths, Linear projections,
# and the pooled text embedding + K micro-conditioning numbers through `add_embedding`
TINY = {
    "base": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=48,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled 16 + 6 time ids
    ),
    "refiner": dict(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=24,
        addition_time_embed_dim=6,
        projection_class_embeddings_input_dim=16 + 5 * 6,  # pooled 16 + 5 time ids (with aesthetic score)
    ),
}
for cfg in TINY.values():
    cfg.update(
        layers_per_block=2,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        sample_size=16,
    )
POOLED = {"base": 16, "refiner": 16}
TIME_IDS = {"base": 6, "refiner": 5}
TIME_IDS_REAL = {"sdxl-base-1.0": 6, "sdxl-refiner-1.0": 5}  # original size, crop corner, target size / aesthetic score


def reduced(name: str) -> dict:
    """The real config with every width divided by 10 (base) or 12 (refiner) and the heads scaled so that
    every level keeps one head width (64 in the real models, 8 here); real levels, block types, layers per
    block and transformer depths (1, 2, 10 / 4); context, pooled and time-id widths scaled alike."""
    raw = reference_config(f"{name}.unet")
    if name == "sdxl-base-1.0":
        widths, heads, context = (32, 64, 128), (4, 8, 16), 64 + 128  # CLIP-L 768 + bigG 1280 -> 64 + 128
    else:
        widths, heads, context = (32, 64, 128, 128), (4, 8, 16, 16), 128  # bigG 1280 -> 128
    pooled, time_dim = 128, 32  # 1280 -> 128; 256 -> 32
    return {
        **raw,
        "block_out_channels": widths,
        "attention_head_dim": heads,
        "cross_attention_dim": context,
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": pooled + TIME_IDS_REAL[name] * time_dim,
    }


def inputs(cfg, batch: int, height: int, width: int, n_ids: int, pooled: int, seed: int = 0) -> dict:
    """UNet arguments: latents, one timestep per sample, context, pooled text and plausible micro-conditioning."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0] if n_ids == 6 else [1024.0, 768.0, 0.0, 0.0, 6.0])
    time_ids = ids.repeat(batch, 1) + torch.randint(0, 64, (batch, n_ids), generator=g)
    return dict(
        sample=torch.randn(batch, cfg.get("in_channels", 4), height, width, generator=g),
        timestep=torch.tensor([999, 1, 500, 250][:batch]),
        encoder_hidden_states=torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": time_ids},
    )


def as_tuples(config) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny_unets(tmp_path_factory):
    """name -> (diffusers reference, minidiff model loaded from its saved folder, that folder), built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(0)
            ref = perturb(diffusers.UNet2DConditionModel(**TINY[name]).eval(), seed=5)
            path = tmp_path_factory.mktemp(f"sdxl-{name}")
            ref.save_pretrained(path)
            built[name] = ref, UNet2DConditionModel.from_pretrained(path), path
        return built[name]

    return get


@pytest.mark.parametrize(
    "name, batch, height, width",
    [("base", 2, 16, 16), ("base", 1, 20, 12), ("refiner", 2, 16, 16), ("refiner", 3, 22, 18)],
)
def test_tiny_parity(tiny_unets, name, batch, height, width):
    ref, ours, _ = tiny_unets(name)
    args = inputs(TINY[name], batch, height, width, TIME_IDS[name], POOLED[name], seed=batch + height)
    assert_same_outputs(ours, ref, lambda m: m(**args).sample)


def test_tiny_one_added_condition_for_the_batch(tiny_unets):
    """One pooled embedding / time-id row for a batch of two broadcasts, as in diffusers."""
    ref, ours, _ = tiny_unets("base")
    args = inputs(TINY["base"], 2, 16, 16, 6, POOLED["base"], seed=3)
    args["added_cond_kwargs"] = {k: v[:1] for k, v in args["added_cond_kwargs"].items()}
    assert_same_outputs(ours, ref, lambda m: m(**args).sample)


def test_tiny_lora_scale_without_adapters_changes_nothing(tiny_unets):
    _, ours, _ = tiny_unets("base")
    args = inputs(TINY["base"], 1, 16, 16, 6, POOLED["base"], seed=4)
    plain = ours(**args).sample
    assert torch.equal(ours(**args, cross_attention_kwargs={"scale": 0.5}).sample, plain)
    (tupled,) = ours(**args, cross_attention_kwargs=None, return_dict=False)
    assert torch.equal(tupled, plain)


def test_tiny_cross_attention_kwargs_scale_scales_lora_as_diffusers(tmp_path):
    """cross_attention_kwargs={"scale": s} against diffusers + peft: the same rank-4 adapters (alpha 8) on
    the attention's to_k / to_v and both embedding MLPs' linear_1 (time and added conditioning)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**TINY["base"]).eval(), seed=6)
    ref.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_v", "linear_1"]))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # the adapters only (lora_B starts at zero); the base weights stay as saved
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    layers, copied = dict(ours.named_modules()), set()
    for name, module in ref.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            down, up = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            # the layer's minidiff name, through the converter's rules (mid_block.attentions.0 -> mid_block.attention)
            (ours_name,) = convert({f"{name}.weight": down}, ours.weights_format.rules(ours.config))
            ours_name = ours_name.removesuffix(".weight")
            lora.attach(layers[ours_name]).add("default", lora.LoRAAdapter(down.clone(), up.clone(), alpha=8))
            copied.add(ours_name)
    assert {"time_embedding.linear_1", "add_embedding.linear_1"} < copied
    assert {name for name, _, _ in lora.lora_layers(ours)} == copied
    args = inputs(TINY["base"], 2, 16, 16, 6, POOLED["base"], seed=9)
    for scale in (0.5, 1.0, 0.0):
        kwargs = {"scale": scale}
        assert_same_outputs(ours, ref, lambda m, kwargs=kwargs: m(**args, cross_attention_kwargs=kwargs).sample)
    # the adapters matter: half their scale is far from the full one
    half, full = (ours(**args, cross_attention_kwargs={"scale": s}).sample for s in (0.5, 1.0))
    assert rel_err(half, full) > 1e-2


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_save_pretrained_loads_bit_exact_in_diffusers(tiny_unets, name, tmp_path):
    ref, ours, _ = tiny_unets(name)
    ours.save_pretrained(tmp_path)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    theirs, again = back.state_dict(), ref.state_dict()
    assert theirs.keys() == again.keys()
    assert all(torch.equal(theirs[k], again[k]) for k in theirs)
    assert as_tuples(back.config) == as_tuples(ref.config)


def test_tiny_sharded_fp16_variant_loads(tmp_path):
    """A sharded fp16 variant (diffusion_pytorch_model.safetensors.index.fp16.json + its shards)."""
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**TINY["refiner"]).eval(), seed=12).half()
    # 500 KB: no shard's header length ends in 0x80 (200 and 300 KB once hit a loading.py bug, tested below)
    ref.save_pretrained(tmp_path, variant="fp16", max_shard_size="500KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = UNet2DConditionModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    theirs, mine = ref.state_dict(), ours.weights_format.export(ours.state_dict(), ours.config)
    assert theirs.keys() == mine.keys()
    assert all(mine[k].dtype == torch.float16 and torch.equal(mine[k], theirs[k]) for k in theirs)


def test_add_embedding_key_missing_is_named(tiny_unets, tmp_path):
    _, _, path = tiny_unets("base")
    sd = load_file(path / "diffusion_pytorch_model.safetensors")
    del sd["add_embedding.linear_2.bias"]
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"missing 1 key\(s\): add_embedding\.linear_2\.bias"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_safetensors_whose_header_length_ends_in_0x80_is_read(tmp_path):
    """A safetensors file starts with its header length, little-endian: a first byte 0x80 is not a pickle."""
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    for pad in range(256):
        save_file({"w": torch.ones(2)}, path, metadata={"format": "pt", "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(read_state_dict([path])["w"], torch.ones(2))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("value", ["text", "image", "text_image", "image_hint"])
def test_other_addition_embed_types_are_refused_by_name(value):
    raw = {**reference_config("sdxl-base-1.0.unet"), "addition_embed_type": value}
    with pytest.raises(ValueError, match=re.escape(f"addition_embed_type={value!r} is not supported")):
        UNet2DConditionModel(raw)


@pytest.mark.parametrize("key", ["addition_time_embed_dim", "projection_class_embeddings_input_dim"])
def test_text_time_without_its_widths_is_refused(key):
    raw = {**reference_config("sdxl-base-1.0.unet"), key: None}
    with pytest.raises(ValueError, match=f"addition_embed_type='text_time' needs {key}"):
        UNet2DConditionModel(raw)


def test_bad_added_cond_kwargs_are_named(tiny_unets):
    _, ours, _ = tiny_unets("base")
    args = inputs(TINY["base"], 2, 16, 16, 6, POOLED["base"])
    cond = args.pop("added_cond_kwargs")
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*pass added_cond_kwargs="):
        ours(**args)
    with pytest.raises(ValueError, match="added_cond_kwargs has no time_ids"):
        ours(**args, added_cond_kwargs={"text_embeds": cond["text_embeds"]})
    with pytest.raises(ValueError, match="added_cond_kwargs has no text_embeds and no time_ids"):
        ours(**args, added_cond_kwargs={})
    with pytest.raises(ValueError, match=r"unknown keys \['image_embeds'\]"):
        ours(**args, added_cond_kwargs={**cond, "image_embeds": cond["text_embeds"]})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 64"):
        ours(**args, added_cond_kwargs={**cond, "time_ids": cond["time_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"text_embeds must be \(B, P\).*got text_embeds \(3, 16\)"):
        ours(**args, added_cond_kwargs={**cond, "text_embeds": torch.randn(3, 16)})
    with pytest.raises(ValueError, match=r"cross_attention_kwargs keys \['gligen'\] are not supported"):
        ours(**args, added_cond_kwargs=cond, cross_attention_kwargs={"gligen": 1})


def test_added_cond_kwargs_refused_by_a_unet_without_them():
    ours = UNet2DConditionModel(**{**TINY["base"], "addition_embed_type": None})
    args = inputs(TINY["base"], 1, 16, 16, 6, POOLED["base"])
    with pytest.raises(ValueError, match=r"added_cond_kwargs \(\['text_embeds', 'time_ids'\]\) given to a UNet"):
        ours(**args)


# ---------------------------------------------------------------- real configs: sizes, reduced widths


@pytest.mark.parametrize(
    "name, cls, count",
    [
        ("sdxl-base-1.0.unet", UNet2DConditionModel, 2_567_463_684),
        ("sdxl-refiner-1.0.unet", UNet2DConditionModel, 2_259_526_660),
        ("sdxl-base-1.0.text_encoder_2", CLIPTextModelWithProjection, 694_659_840),
    ],
)
def test_real_parameter_counts(name, cls, count):
    with torch.device("meta"):
        model = cls(reference_config(name))
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.fixture(scope="module", params=["sdxl-base-1.0", "sdxl-refiner-1.0"])
def reduced_unet(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(1)
    ref = perturb(diffusers.UNet2DConditionModel.from_config(reduced(name)).eval(), seed=7)
    path = tmp_path_factory.mktemp(f"{name}-reduced")
    ref.save_pretrained(path)
    return name, ref, UNet2DConditionModel.from_pretrained(path)


@pytest.mark.parametrize("batch, height, width", [(2, 32, 32), (1, 36, 28)])
def test_reduced_width_real_depth_parity(reduced_unet, batch, height, width):
    name, ref, ours = reduced_unet
    cfg = reduced(name)
    assert [len(b.attentions[0].transformer_blocks) for b in ours.down_blocks if b.attentions is not None] == [
        d
        for d, kind in zip(ours.config.level("transformer_layers_per_block"), cfg["down_block_types"])
        if "Cross" in kind
    ]
    args = inputs(cfg, batch, height, width, TIME_IDS_REAL[name], 128, seed=height)
    assert_same_outputs(ours, ref, lambda m: m(**args).sample)


# ---------------------------------------------------------------- CLIPTextModelWithProjection


def bigg_like(**more) -> transformers.CLIPTextConfig:
    """text_encoder_2's settings (gelu, eos_token_id 2, pad "!" = id 0 in the ids) at a tiny width."""
    base = dict(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=24,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return transformers.CLIPTextConfig(**(base | more))


# one prompt padded with "!" (id 0, as tokenizer_2 pads), one filling all 77 positions
PROMPT_IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70, [49406] + [1929] * 75 + [49407]])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(transformers.CLIPTextModelWithProjection(bigg_like()).eval(), seed=2)
    path = tmp_path_factory.mktemp("clip-proj")
    ref.save_pretrained(path)
    return ref, path


def clip_outputs(model) -> tuple[torch.Tensor, ...]:
    """text_embeds, the penultimate hidden states (SDXL's context), the final states, `[0]`; the layer count."""
    with torch.no_grad():
        out = model(PROMPT_IDS, output_hidden_states=True)
    return out.text_embeds, out.hidden_states[-2], out.last_hidden_state, out[0], len(out.hidden_states)


def _assert_clip_parity(ours, ref_outputs: tuple, tolerance: float = 1e-4) -> None:
    *got, n = clip_outputs(ours)
    *want, n_ref = ref_outputs
    assert n == n_ref
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= tolerance


def test_tiny_clip_with_projection_parity(tiny_clip):
    ref, path = tiny_clip
    ours = CLIPTextModelWithProjection.from_pretrained(path)
    _assert_clip_parity(ours, clip_outputs(ref))
    assert torch.equal(ours(PROMPT_IDS)[0], ours(PROMPT_IDS).text_embeds)  # [0] is text_embeds, as transformers


def test_tiny_clip_without_text_model_prefix_loads(tiny_clip, tmp_path):
    """Keys saved without `text_model.` (as transformers 5 saves a CLIPTextModel) load too."""
    ref, path = tiny_clip
    sd = load_file(path / "model.safetensors")
    save_file({k.removeprefix("text_model."): v for k, v in sd.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _assert_clip_parity(CLIPTextModelWithProjection.from_pretrained(tmp_path), clip_outputs(ref))


def test_tiny_clip_save_pretrained_loads_bit_exact_in_transformers(tiny_clip, tmp_path):
    ref, path = tiny_clip
    CLIPTextModelWithProjection.from_pretrained(path).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["CLIPTextModelWithProjection"]
    back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path)
    theirs, again = back.state_dict(), ref.state_dict()
    assert theirs.keys() == again.keys() and all(torch.equal(theirs[k], again[k]) for k in theirs)


def test_tiny_clip_projection_missing_or_ignored(tiny_clip, tmp_path):
    ref, path = tiny_clip
    # a CLIPTextModel folder has no projection: named, not left at random
    transformers.CLIPTextModel(bigg_like()).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match=r"missing 1 key\(s\): text_projection\.weight"):
        CLIPTextModelWithProjection.from_pretrained(tmp_path)
    # the projection's folder read as a plain CLIPTextModel: the projection is not part of it
    plain = CLIPTextModel.from_pretrained(path)
    assert rel_err(plain(PROMPT_IDS).pooler_output, ref.text_model(PROMPT_IDS).pooler_output) <= 1e-5


def test_tiny_clip_inputs_embeds_has_no_text_embeds(tiny_clip):
    _, path = tiny_clip
    ours = CLIPTextModelWithProjection.from_pretrained(path)
    out = ours(inputs_embeds=ours.token_embedding(PROMPT_IDS))
    assert out.text_embeds is None and torch.equal(out[0], out.last_hidden_state)
    assert torch.equal(out.last_hidden_state, ours(PROMPT_IDS).last_hidden_state)


@pytest.mark.slow
def test_real_text_encoder_2_and_its_fp16_variant(tmp_path):
    """text_encoder_2 at its real size (694,659,840 parameters), fp32, then its fp16 variant."""
    torch.manual_seed(0)
    ref = perturb(
        transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**reference_config("sdxl-base-1.0.text_encoder_2"))
        ).eval(),
        seed=3,
    )
    ref.save_pretrained(tmp_path)
    want = clip_outputs(ref)
    ref.half().save_pretrained(tmp_path, variant="fp16")  # as the Hub's fp16 files were made
    del ref
    gc.collect()
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path)
    _assert_clip_parity(ours, want)
    assert (tmp_path / "model.fp16.safetensors").is_file()
    half = CLIPTextModelWithProjection.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    shutil.rmtree(tmp_path)  # 4.2 GB of weights: pytest keeps the temporary folders of its last three runs
    fp32, fp16 = ours.state_dict(), half.state_dict()
    assert fp32.keys() == fp16.keys()
    assert all(fp16[k].dtype == torch.float16 and torch.equal(fp16[k], fp32[k].half()) for k in fp32)
    assert not torch.equal(fp16["text_projection.weight"].float(), fp32["text_projection.weight"])
    del ours, half, fp32, fp16
    gc.collect()  # before the next big test


# ---------------------------------------------------------------- the real SDXL base UNet


def release_freed_memory() -> None:
    """Collect cycles, then hand glibc's freed heap back to the OS: after earlier big tests raise its
    mmap threshold, a freed 10 GB model otherwise stays resident (measured: 6.7 GB of it)."""
    gc.collect()
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc (musl): nothing to trim
            pass


@pytest.mark.slow
def test_real_sdxl_base_unet_one_copy_at_a_time(tmp_path):
    """The real 2.57B-parameter UNet, fp32, 32x32 latents, batch 2. Each library's model lives alone:
    diffusers' is built, saved in 2 GB shards (like the Hub), run and freed before minidiff's is loaded."""
    raw = reference_config("sdxl-base-1.0.unet")
    release_freed_memory()  # whatever earlier tests left, before 10 GB more
    torch.manual_seed(0)
    # perturbed by 0.01, not conftest's 0.05: at 0.05 the 70 transformer blocks make the model chaotic
    # (diffusers run on 1 vs 2 threads already differs by 1.9e-3); at 0.01 that noise floor is 9e-7
    ref = perturb(diffusers.UNet2DConditionModel.from_config(raw).eval(), seed=11, scale=0.01)
    ref.save_pretrained(tmp_path, max_shard_size="2GB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    g = torch.Generator().manual_seed(0)
    args = dict(
        sample=torch.randn(2, 4, 32, 32, generator=g),
        timestep=torch.tensor([999, 1]),
        encoder_hidden_states=torch.randn(2, 77, 2048, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 1280, generator=g),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 768, 1344]]),
        },
    )
    with torch.no_grad():
        want = ref(**args).sample
    del ref
    release_freed_memory()
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    # the 10.3 GB of shards go now: pytest keeps the temporary folders of its last three runs
    shutil.rmtree(tmp_path)
    with torch.no_grad():
        got = ours(**args).sample
    del ours
    gc.collect()
    err = rel_err(got, want)
    print(f"real SDXL base UNet, 32x32 latents, batch 2: rel err {err:.2e}")
    assert err <= 1e-4
