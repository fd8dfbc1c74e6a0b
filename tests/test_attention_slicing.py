"""Attention slicing (`Attention.slice_size`, diffusers' SlicedAttnProcessor): the batch x heads attention
maps computed a few at a time give the unsliced result, and diffusers' sliced UNet's."""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_COND_UNET, perturb, rel_err

from minidiff.layers import Attention, AttentionBlock2D
from minidiff.unet_2d_condition import UNet2DConditionModel


def attention(heads: int, context_dim: int | None = None, upcast: bool = False, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return perturb(Attention(32, context_dim, heads=heads, head_dim=8, bias=True, upcast=upcast), seed)


def sliced(module: Attention, size: int | None, *args, **kwargs) -> torch.Tensor:
    module.slice_size = size
    try:
        return module(*args, **kwargs)
    finally:
        module.slice_size = None


@pytest.fixture
def sdpa_batches(monkeypatch):
    """The batch x heads count of every SDPA call from now on."""
    seen: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        seen.append(q.shape[0] if q.ndim == 3 else q.shape[0] * q.shape[1])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return seen


@pytest.mark.parametrize("size", [1, 3, 8, 100])
def test_sliced_self_and_cross_attention_equal_unsliced(size, sdpa_batches):
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        for module, args in ((attention(4), (x,)), (attention(4, context_dim=24), (x, context))):
            full = module(*args)
            del sdpa_batches[:]
            out = sliced(module, size, *args)
            assert rel_err(out, full) < 1e-6
            # 2 images x 4 heads = 8 maps, at most `size` per SDPA call
            assert sum(sdpa_batches) == 8 and max(sdpa_batches) == min(size, 8)


@pytest.mark.parametrize("size", [1, 5])
def test_sliced_causal_and_masked_attention(size):
    """CLIP's forms: causal, and an explicit (B, 1, N, N) causal + padding mask."""
    module = attention(4, seed=2)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(3))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    padding = torch.arange(9)[None, :] < torch.tensor([9, 6, 4])[:, None]
    mask = causal & padding[:, None, None, :]
    with torch.no_grad():
        assert rel_err(sliced(module, size, x, causal=True), module(x, causal=True)) < 1e-6
        assert rel_err(sliced(module, size, x, causal=True, mask=mask), module(x, causal=True, mask=mask)) < 1e-6


def test_sliced_upcast_attention_in_bfloat16():
    module = attention(4, upcast=True, seed=4).to(torch.bfloat16)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(sliced(module, 3, x), module(x))  # each map computed alike, in fp32


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    ref = perturb(diffusers.UNet2DConditionModel(**TINY_COND_UNET, sample_size=8, attention_head_dim=2).eval())
    path = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(path)
    return ref, UNet2DConditionModel.from_pretrained(path)


def test_sliced_unet_matches_diffusers_sliced_unet(unets, sdpa_batches):
    ref, ours = unets
    g = torch.Generator().manual_seed(6)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        full = ours(sample, 10, context).sample
        ref.set_attention_slice(1)
        for module in ours.modules():
            if isinstance(module, Attention):
                module.slice_size = 1
        del sdpa_batches[:]
        out = ours(sample, 10, context).sample
        expected = ref(sample, 10, encoder_hidden_states=context).sample
        for module in ours.modules():
            if isinstance(module, Attention):
                module.slice_size = None
        ref.set_default_attn_processor()
    assert sdpa_batches and max(sdpa_batches) == 1  # one (image, head) map at a time
    assert rel_err(out, full) < 1e-6
    assert rel_err(out, expected) < 1e-5


def test_sliced_vae_mid_block_attention():
    """The VAE's spatial attention (AttentionBlock2D, one head) slices over the batch."""
    module = perturb(AttentionBlock2D(16, groups=4), seed=7)
    x = torch.randn(3, 16, 6, 5, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(sliced(module, 1, x), module(x)) < 1e-6
