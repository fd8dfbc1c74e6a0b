"""VAE tiling and slicing against diffusers' AutoencoderKL with the same switches on.

Tiled encode / decode of images larger than a tile (a small `sample_size` keeps the tiles small) must
give diffusers' tiled numbers, seams blended the same way; sliced encode / decode must give the
unsliced result and diffusers' sliced one. Every weight perturbed, saved in the diffusers layout and
loaded through minidiff's from_pretrained (so fast.py's channels_last decoder hooks are on).
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import perturb, reference_config, rel_err, vae_config

from minidiff.autoencoder_kl import AutoencoderKL

TOL = 1e-5  # fp32, same maths per tile: only summation-order noise


def build(config: dict, tmp_path_factory, name: str, seed: int):
    ref = perturb(diffusers.AutoencoderKL(**config).eval(), seed=seed)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    return ref, AutoencoderKL.from_pretrained(path)


@pytest.fixture(scope="module")
def two_levels(tmp_path_factory):
    """Downsampling x2: tiles of 32 pixels / 16 latents."""
    return build(vae_config((16, 32), latent_channels=4, sample_size=32), tmp_path_factory, "vae2", seed=5)


@pytest.fixture(scope="module")
def three_levels(tmp_path_factory):
    """Downsampling x4: tiles of 32 pixels / 8 latents."""
    return build(vae_config((16, 32, 32), latent_channels=4, sample_size=32), tmp_path_factory, "vae3", seed=6)


def switches(*models, tiling: bool = False, slicing: bool = False) -> None:
    for m in models:
        m.enable_tiling() if tiling else m.disable_tiling()
        m.enable_slicing() if slicing else m.disable_slicing()


def count_calls(module: torch.nn.Module) -> list[tuple[int, ...]]:
    """The input shapes `module` is called with from now on (until the hook's handle is removed)."""
    shapes: list[tuple[int, ...]] = []
    module._shape_hook = module.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes


def image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("fixture", ["two_levels", "three_levels"])
def test_tiled_encode_and_decode_match_diffusers(request, fixture):
    ref, ours = request.getfixturevalue(fixture)
    factor = 2 ** (len(ours.config.block_out_channels) - 1)
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (
        ref.tile_sample_min_size,
        ref.tile_latent_min_size,
        ref.tile_overlap_factor,
    )
    x = image(2, 3, 88, 56)  # not a whole number of tiles either way
    z = image(2, 4, 88 // factor, 56 // factor, seed=1)
    switches(ref, ours)
    plain_mean, plain_image = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    switches(ref, ours, tiling=True)
    with torch.no_grad():
        ref_posterior, ref_image = ref.encode(x).latent_dist, ref.decode(z).sample
    calls = count_calls(ours.decoder)
    posterior, decoded = ours.encode(x).latent_dist, ours.decode(z).sample
    ours.decoder._shape_hook.remove()
    assert rel_err(posterior.mean, ref_posterior.mean) < TOL
    assert rel_err(posterior.logvar, ref_posterior.logvar) < TOL
    assert rel_err(decoded, ref_image) < TOL
    # it did tile: several decoder calls, none bigger than a tile, and the seams differ from the untiled result
    tile = ours.tile_latent_min_size
    assert len(calls) > 1 and all(max(s[-2:]) <= tile for s in calls)
    assert (decoded - plain_image).abs().max() > 1e-3 and (posterior.mean - plain_mean).abs().max() > 1e-3
    # the public methods tile whatever the size
    small = z[:, :, :tile, :tile]
    assert rel_err(ours.tiled_decode(small).sample, ref.tiled_decode(small).sample) < TOL
    switches(ref, ours)


def test_images_within_a_tile_are_not_tiled(two_levels):
    ref, ours = two_levels
    switches(ours, tiling=True)
    z = image(1, 4, 16, 16)
    calls = count_calls(ours.decoder)
    tiled = ours.decode(z).sample
    ours.decoder._shape_hook.remove()
    switches(ours)
    assert calls == [(1, 4, 16, 16)] and torch.equal(tiled, ours.decode(z).sample)


def test_slicing_gives_the_unsliced_result_and_diffusers(two_levels):
    ref, ours = two_levels
    x, z = image(3, 3, 32, 24), image(3, 4, 16, 12, seed=2)
    switches(ref, ours)
    plain_mean, plain_image = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    switches(ref, ours, slicing=True)
    calls = count_calls(ours.decoder)
    mean, decoded = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    ours.decoder._shape_hook.remove()
    assert calls == [(1, 4, 16, 12)] * 3  # one image at a time
    assert rel_err(mean, plain_mean) < TOL and rel_err(decoded, plain_image) < TOL
    with torch.no_grad():
        assert rel_err(decoded, ref.decode(z).sample) < TOL
        assert rel_err(mean, ref.encode(x).latent_dist.mean) < TOL
    # slicing and tiling together
    switches(ref, ours, tiling=True, slicing=True)
    big = image(2, 4, 40, 20, seed=3)
    with torch.no_grad():
        assert rel_err(ours.decode(big).sample, ref.decode(big).sample) < TOL
    switches(ref, ours)


def test_real_configs_tile_sizes_and_tiled_decode(tmp_path_factory):
    """The tile sizes derived from the real SD 1.5 and SDXL VAE configs; the SD 1.5 VAE's tiled decode (its
    sample_size lowered to 64 so that a 96-pixel image takes four tiles)."""
    for name in ("sd-v1-5.vae", "sdxl-base-1.0.vae"):
        config = {k: v for k, v in reference_config(name).items() if not k.startswith("_")}
        with torch.device("meta"):
            ref, ours = diffusers.AutoencoderKL(**config), AutoencoderKL(**config)
        expected = (ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor)
        assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == expected
    config = reference_config("sd-v1-5.vae") | {"sample_size": 64}
    ref, ours = build(config, tmp_path_factory, "vae-sd15-tiles", seed=7)
    switches(ref, ours, tiling=True)
    z = image(1, 4, 12, 12)
    with torch.no_grad():
        assert rel_err(ours.decode(z).sample, ref.decode(z).sample) < 1e-4
