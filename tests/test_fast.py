"""minidiff/fast.py: the CPU fast paths change speed, never the maths, the parameters or the keys."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_COND_UNET, TINY_UNET_2D, perturb, rel_err, vae_config

from minidiff import AutoencoderKL, UNet2DConditionModel, UNet2DModel, fast
from minidiff.layers import ResnetBlock2D


def _tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_COND_UNET, sample_size=8, attention_head_dim=2)
    ddpm = UNet2DModel(**TINY_UNET_2D)
    vae = AutoencoderKL(**vae_config((16, 32)))
    return {"unet": perturb(unet.eval()), "ddpm": perturb(ddpm.eval()), "vae": perturb(vae.eval())}


def _run(name: str, model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "unet":  # 8x8 latents: the GEMM conv path is taken on every level
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
        return model(x, 10, encoder_hidden_states=ctx).sample
    if name == "ddpm":
        return model(torch.randn(2, 3, 8, 8, generator=g), 10).sample
    return model.decode(torch.randn(1, 4, 8, 8, generator=g)).sample


@pytest.mark.parametrize("name", ["unet", "ddpm", "vae"])
def test_fast_paths_keep_outputs_parameters_and_keys(name):
    plain = _tiny_models()[name]
    dressed = fast.apply(copy.deepcopy(plain))
    assert any(type(m) is fast.InplaceResnetBlock2D for m in dressed.modules())
    assert any(type(m) is fast.GemmConv2d for m in dressed.modules())
    assert not any(type(m) in (fast.InplaceResnetBlock2D, fast.GemmConv2d) for m in plain.modules())
    assert list(dressed.state_dict()) == list(plain.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), dressed.state_dict().values()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        want, got = _run(name, plain), _run(name, dressed)
    assert rel_err(got, want) < 1e-5
    assert got.is_contiguous()  # the VAE decoder's channels_last is undone on the way out
    # with gradients the plain maths runs (no in-place update of a tensor autograd needs)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    if name == "vae":
        dressed.decode(x).sample.sum().backward()
        assert x.grad is not None


def test_apply_is_idempotent_and_loading_applies_it(tmp_path):
    model = _tiny_models()["vae"]
    fast.apply(model)
    hooks = len(model.decoder._forward_pre_hooks)
    fast.apply(model)
    assert len(model.decoder._forward_pre_hooks) == hooks
    model.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert all(type(m) is fast.InplaceResnetBlock2D for m in loaded.modules() if isinstance(m, ResnetBlock2D))
