"""UNet2DConditionModel parity with diffusers: tiny SD1 / SD2 / inpainting configs and the real
SD 1.5 and SD 2.1 configs, every weight perturbed, loaded through minidiff's from_pretrained."""

from __future__ import annotations

import gc
import re

import diffusers
import pytest
import torch
from conftest import assert_missing_keys_mean_diffusers_defaults, perturb, reference_config
from safetensors.torch import load_file, save_file

from minidiff.compare import assert_same_outputs
from minidiff.unet_2d_condition import UNet2DConditionModel
from weights_conversion import ConversionError

WEIGHTS = "diffusion_pytorch_model.safetensors"
FOUR_LEVELS = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    sample_size=16,
)
TINY = {
    # SD1-like: 1x1-conv projections, one head count for every level, 768 -> 32 context
    "sd1": dict(FOUR_LEVELS, layers_per_block=2, cross_attention_dim=32, attention_head_dim=4),
    # SD2-like: Linear projections, per-level head counts, upcast attention, wider context
    "sd2": dict(
        FOUR_LEVELS,
        layers_per_block=1,
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    # inpainting: latents + mask + masked-image latents in, 4 channels out; two transformer layers per block
    "inpaint": dict(
        FOUR_LEVELS,
        in_channels=9,
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        transformer_layers_per_block=2,
    ),
}


def as_tuples(config) -> dict:
    """A diffusers config without its bookkeeping, JSON lists and tuples alike."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if not k.startswith("_")}


def timestep(kind: str, batch: int) -> int | float | torch.Tensor:
    return {
        "int": 999,
        "float": 500.5,
        "0d": torch.tensor(250),
        "1d": torch.tensor([981, 1, 40, 700][:batch]),
    }[kind]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (diffusers reference, minidiff model loaded from its saved folder, that folder), built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            ref = perturb(diffusers.UNet2DConditionModel(**TINY[name]).eval(), seed=1)
            path = tmp_path_factory.mktemp(f"unet-{name}")
            ref.save_pretrained(path)
            built[name] = ref, UNet2DConditionModel.from_pretrained(path), path
        return built[name]

    return get


@pytest.fixture(params=list(TINY))
def tiny(request, tiny_models):
    return (request.param, *tiny_models(request.param))


@pytest.mark.parametrize(
    "name, batch, height, width, t",
    [
        ("sd1", 2, 32, 32, "1d"),
        ("sd1", 1, 44, 36, "int"),  # odd: 44 -> 22 -> 11 -> 6, the decoder must upsample 6 -> 11
        ("sd1", 3, 24, 40, "0d"),
        ("sd1", 2, 11, 9, "float"),
        ("sd2", 2, 32, 32, "1d"),
        ("sd2", 1, 44, 36, "0d"),
        ("inpaint", 2, 24, 40, "int"),
        ("inpaint", 1, 36, 44, "float"),
    ],
)
def test_tiny_parity(tiny_models, name, batch, height, width, t):
    ref, ours, _ = tiny_models(name)
    g = torch.Generator().manual_seed(batch * height + width)
    x = torch.randn(batch, ref.config.in_channels, height, width, generator=g)
    ctx = torch.randn(batch, 7, ref.config.cross_attention_dim, generator=g)
    assert_same_outputs(ours, ref, lambda m: m(x, timestep(t, batch), encoder_hidden_states=ctx).sample)


def test_tiny_output_forms(tiny):
    _, _, ours, _ = tiny
    x = torch.randn(1, ours.config.in_channels, 16, 16)
    ctx = torch.randn(1, 5, ours.config.cross_attention_dim)
    out = ours(x, 10, encoder_hidden_states=ctx)
    assert torch.equal(out.sample, out[0]) and torch.equal(out["sample"], out.sample)
    (plain,) = ours(x, 10, ctx, return_dict=False)
    assert torch.equal(plain, out.sample)


def test_save_pretrained_loads_bit_exact_in_diffusers(tiny, tmp_path):
    name, ref, ours, _ = tiny
    ours.save_pretrained(tmp_path)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)
    theirs, again = back.state_dict(), ref.state_dict()
    assert theirs.keys() == again.keys()
    assert all(torch.equal(theirs[k], again[k]) for k in theirs)
    assert as_tuples(back.config) == as_tuples(ref.config)


def test_missing_or_extra_key_is_named(tiny, tmp_path):
    _, _, _, path = tiny
    sd = load_file(path / WEIGHTS)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())

    missing = dict(sd)
    del missing["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    save_file(missing, tmp_path / WEIGHTS)
    with pytest.raises(
        ConversionError,
        match=r"missing 1 key\(s\): down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight",
    ):
        UNet2DConditionModel.from_pretrained(tmp_path)

    save_file({**sd, "down_blocks.0.resnets.7.conv1.weight": torch.zeros(1)}, tmp_path / WEIGHTS)
    with pytest.raises(ConversionError, match=r"unexpected 1 key\(s\): down_blocks\.0\.resnets\.7\.conv1\.weight"):
        UNet2DConditionModel.from_pretrained(tmp_path)

    save_file({**sd, "add_embedding.linear_1.weight": torch.zeros(1)}, tmp_path / WEIGHTS)
    with pytest.raises(ConversionError, match=r"no rule for 1 key\(s\): add_embedding\.linear_1\.weight"):
        UNet2DConditionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"class_embed_type": "timestep"},
        {"num_class_embeds": 10},
        {"addition_embed_type": "text"},
        {"time_embedding_type": "fourier"},
        {"encoder_hid_dim_type": "text_proj"},
        {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
        {"resnet_time_scale_shift": "scale_shift"},
        {"only_cross_attention": True},
        {
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
        },
        {"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    ],
    ids=lambda change: next(iter(change)),
)
def test_unsupported_config_is_refused_by_name(change):
    raw = {**reference_config("sd-v1-5.unet"), **change}
    key, value = next(iter(change.items()))
    shown = value[1] if isinstance(value, list) else value
    with pytest.raises(ValueError, match=re.escape(f"{key}={shown!r} is not supported")):
        UNet2DConditionModel(raw)


def test_missing_config_keys_mean_diffusers_defaults():
    """A config.json without a key means diffusers' default for it, not minidiff's SD1.5 default."""
    assert_missing_keys_mean_diffusers_defaults(UNet2DConditionModel, diffusers.UNet2DConditionModel)


def test_attention_head_dim_counts_heads():
    sd2 = UNet2DConditionModel._config_from_dict(reference_config("sd-v2-1.unet"))
    with torch.device("meta"):
        model = UNet2DConditionModel(sd2)
    heads = [
        blk.attentions[0].transformer_blocks[0].attn1.heads for blk in model.down_blocks if blk.attentions is not None
    ]
    assert heads == [5, 10, 20]
    assert model.mid_block.attention.transformer_blocks[0].attn2.heads == 20
    assert model.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024


# ---------------------------------------------------------------- real SD 1.5 / SD 2.1 configs


@pytest.fixture(scope="class")
def real(request, tmp_path_factory):
    """The real-size UNet: diffusers built from the reference config, perturbed, saved once, loaded by minidiff."""
    name = request.param
    ref = perturb(diffusers.UNet2DConditionModel.from_config(reference_config(f"{name}.unet")).eval(), seed=2)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    ours = UNet2DConditionModel.from_pretrained(path)
    (path / WEIGHTS).unlink()  # 3.4 GB: keep the disk free for the next config
    yield name, ref, ours
    del ref, ours
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("real", ["sd-v1-5", "sd-v2-1"], indirect=True, scope="class")
class TestRealConfig:
    def test_square_batch_of_two(self, real):
        _, ref, ours = real
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 32, 32, generator=g)
        ctx = torch.randn(2, 77, ref.config.cross_attention_dim, generator=g)
        t = torch.tensor([999, 1])
        assert_same_outputs(ours, ref, lambda m: m(x, t, encoder_hidden_states=ctx).sample)

    def test_odd_latent_size(self, real):
        # 36x28 latents (a 288x224 image): 36 -> 18 -> 9 -> 5 on the way down, so the decoder must
        # upsample 5 -> 9, not 10, to meet the skip connection (and 4 -> 7 across)
        _, ref, ours = real
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 36, 28, generator=g)
        ctx = torch.randn(1, 77, ref.config.cross_attention_dim, generator=g)
        assert_same_outputs(ours, ref, lambda m: m(x, 500, encoder_hidden_states=ctx).sample)
