"""AutoencoderKL parity with diffusers at a tiny config and the real SD VAE config (small images),
every weight perturbed, loaded through minidiff's from_pretrained; legacy attention names; round trip."""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import assert_missing_keys_mean_diffusers_defaults, perturb, reference_config, rel_err
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as ReferenceGaussian
from safetensors.torch import load_file, save_file

from minidiff.autoencoder_kl import AutoencoderKL, DiagonalGaussianDistribution
from minidiff.compare import assert_same_outputs, compare_layers
from weights_conversion import ConversionError

WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)
LEGACY = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def build(config: dict, tmp_path_factory, name: str, seed: int):
    ref = perturb(diffusers.AutoencoderKL(**config).eval(), seed=seed)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    return ref, AutoencoderKL.from_pretrained(path), path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(TINY, tmp_path_factory, "vae-tiny", seed=3)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build(reference_config("sd-v1-5.vae"), tmp_path_factory, "vae-sd15", seed=4)


def check_encode(ours, ref, x: torch.Tensor, tolerance: float = 1e-4) -> None:
    a, b = ours.encode(x).latent_dist, ref.encode(x).latent_dist
    errors = {name: rel_err(getattr(a, name), getattr(b, name)) for name in ("mean", "std", "var", "logvar")}
    errors["mode"] = rel_err(a.mode(), b.mode())
    errors["sample"] = rel_err(a.sample(torch.Generator().manual_seed(7)), b.sample(torch.Generator().manual_seed(7)))
    if max(errors.values()) > tolerance:
        report = compare_layers(ours, ref, lambda m: m.encode(x).latent_dist.mean, tolerance)
        pytest.fail(f"encode errors {errors}\n{report}")


def check_decode(ours, ref, z: torch.Tensor) -> None:
    # decoded images live in [-1, 1]; PARITY.md's 3e-4 is for images in [0, 1], 1e-4 is stricter
    assert_same_outputs(ours, ref, lambda m: m.decode(z).sample)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 24, 40), (1, 3, 36, 28)], ids=str)
def test_tiny_encode(tiny, shape):
    ref, ours, _ = tiny
    check_encode(ours, ref, torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])))


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 9, 7), (1, 4, 5, 12)], ids=str)
def test_tiny_decode(tiny, shape):
    ref, ours, _ = tiny
    check_decode(ours, ref, torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])))


def test_tiny_forward_reconstructs(tiny):
    ref, ours, _ = tiny
    x = torch.randn(1, 3, 16, 16)
    assert_same_outputs(ours, ref, lambda m: m(x).sample)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert (
        rel_err(
            ours(x, sample_posterior=True, generator=g()).sample, ref(x, sample_posterior=True, generator=g()).sample
        )
        < 1e-4
    )


def test_without_quant_convs(tmp_path_factory):
    config = dict(
        TINY,
        block_out_channels=(16, 32),
        down_block_types=TINY["down_block_types"][:2],
        up_block_types=TINY["up_block_types"][:2],
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    ref, ours, _ = build(config, tmp_path_factory, "vae-noquant", seed=5)
    assert ours.quant_conv is None and ours.post_quant_conv is None
    check_encode(ours, ref, torch.randn(1, 3, 16, 16))
    check_decode(ours, ref, torch.randn(1, 4, 8, 8))


def test_legacy_attention_names_load_identically(tiny, tmp_path):
    ref, ours, path = tiny
    sd = load_file(path / WEIGHTS)
    legacy = {}
    for key, tensor in sd.items():
        for new, old in LEGACY.items():
            if ".mid_block.attentions.0." in key and new in key:
                key = key.replace(new, old)
        legacy[key] = tensor
    assert sum(".proj_attn." in k or ".query." in k for k in legacy) == 8  # both mid blocks, weight + bias
    save_file(legacy, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    a, b = loaded.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check_decode(loaded, ref, torch.randn(1, 4, 8, 8))
    # ... and are never written back: saving uses today's names
    loaded.save_pretrained(tmp_path / "again")
    assert load_file(tmp_path / "again" / WEIGHTS).keys() == sd.keys()


def test_missing_or_extra_key_is_named(tiny, tmp_path):
    _, _, path = tiny
    sd = load_file(path / WEIGHTS)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    missing = dict(sd)
    del missing["decoder.mid_block.attentions.0.to_v.bias"]
    save_file(missing, tmp_path / WEIGHTS)
    with pytest.raises(ConversionError, match=r"missing 1 key\(s\): decoder\.mid_block\.attention\.to_v\.bias"):
        AutoencoderKL.from_pretrained(tmp_path)
    save_file(
        {**sd, "encoder.mid_block.attentions.0.value.bias": sd["encoder.mid_block.attentions.0.to_v.bias"].clone()},
        tmp_path / WEIGHTS,
    )
    with pytest.raises(ConversionError, match=r"both map to 'encoder\.mid_block\.attention\.to_v\.bias'"):
        AutoencoderKL.from_pretrained(tmp_path)
    save_file({**sd, "decoder.up_blocks.0.upsamplers.1.conv.weight": torch.zeros(1)}, tmp_path / WEIGHTS)
    with pytest.raises(
        ConversionError, match=r"no rule for 1 key\(s\): decoder\.up_blocks\.0\.upsamplers\.1\.conv\.weight"
    ):
        AutoencoderKL.from_pretrained(tmp_path)


def test_gaussian_matches_diffusers_including_clamp():
    params = torch.randn(2, 8, 3, 5) * 30  # log-variances far outside [-30, 20]
    a, b = DiagonalGaussianDistribution(params), ReferenceGaussian(params)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.logvar.min() == -30 and a.logvar.max() == 20
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    assert torch.equal(a.sample(gens()), b.sample(gens()))
    assert torch.equal(a.sample(torch.Generator().manual_seed(0)), b.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(a.mode(), b.mode())


def test_unsupported_config_is_refused_by_name():
    with pytest.raises(ValueError, match=r"down_block_types='AttnDownEncoderBlock2D' is not supported"):
        AutoencoderKL({**reference_config("sd-v1-5.vae"), "down_block_types": ["AttnDownEncoderBlock2D"] * 4})


def test_missing_config_keys_mean_diffusers_defaults():
    assert_missing_keys_mean_diffusers_defaults(AutoencoderKL, diffusers.AutoencoderKL)
    sd15 = AutoencoderKL._config_from_dict(reference_config("sd-v1-5.vae"))
    assert sd15.scaling_factor == 0.18215 and sd15.layers_per_block == 2


# ---------------------------------------------------------------- the real SD VAE config, small images


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 72, 56)], ids=str)
def test_real_encode(real, shape):
    ref, ours, _ = real
    check_encode(ours, ref, torch.rand(shape, generator=torch.Generator().manual_seed(shape[-1])) * 2 - 1)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 9, 7)], ids=str)
def test_real_decode(real, shape):
    ref, ours, _ = real
    check_decode(ours, ref, torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])))


@pytest.mark.slow
def test_real_save_pretrained_loads_bit_exact_in_diffusers(real, tmp_path):
    ref, ours, _ = real
    ours.save_pretrained(tmp_path)
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path)
    theirs, again = back.state_dict(), ref.state_dict()
    assert theirs.keys() == again.keys()
    assert all(torch.equal(theirs[k], again[k]) for k in theirs)
    plain = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert plain(back.config) == plain(ref.config)
