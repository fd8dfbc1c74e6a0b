"""The per-layer comparison tool: pairing through the converter's rules, and naming the first divergence."""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import perturb

from minidiff.autoencoder_kl import AutoencoderKL
from minidiff.compare import assert_same_outputs, compare_layers, module_pairs
from minidiff.unet_2d_condition import UNet2DConditionModel

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0."


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    ref = perturb(
        diffusers.UNet2DConditionModel(
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=8,
            attention_head_dim=2,
            sample_size=8,
        ).eval(),
        seed=5,
    )
    path = tmp_path_factory.mktemp("compare-unet")
    ref.save_pretrained(path)
    return ref, UNet2DConditionModel.from_pretrained(path)


def run(model):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 3, 8, generator=g)
    return model(x, 99, encoder_hidden_states=ctx).sample


def test_pairs_follow_the_renames(unets):
    ref, ours = unets
    pairs = module_pairs(ours, ref)
    assert pairs[BLOCK + "attn1.to_out"] == BLOCK + "attn1.to_out.0"
    assert pairs[BLOCK + "ff.proj_in"] == BLOCK + "ff.net.0.proj"
    assert pairs[BLOCK + "ff.proj_out"] == BLOCK + "ff.net.2"
    assert pairs[BLOCK + "ff"] == BLOCK + "ff"
    assert pairs["down_blocks.0.downsample.conv"] == "down_blocks.0.downsamplers.0.conv"
    assert pairs["down_blocks.0.downsample"] == "down_blocks.0.downsamplers.0"
    assert pairs["mid_block.attention"] == "mid_block.attentions.0"
    assert pairs["up_blocks.0.upsample.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert pairs[""] == ""


def test_identical_models_report_no_divergence(unets):
    ref, ours = unets
    report = compare_layers(ours, ref, run)
    assert report.first_divergence is None, str(report)
    assert report.unpaired == []
    assert len(report.layers) > 50 and report.output_rel_err < 1e-5
    assert "within rel err" in str(report)


def test_first_divergence_names_the_broken_module(unets):
    ref, ours = unets
    broken = BLOCK + "attn2.to_k"
    weight = ours.get_submodule(broken).weight
    saved = weight.clone()
    try:
        weight[0, 0] += 0.5
        report = compare_layers(ours, ref, run)
        first = report.first_divergence
        assert (first.name, first.reference_name, first.call) == (broken, broken, 0)
        assert first.rel_err > 1e-3 and first.shape == (2, 3, 16)
        assert broken in str(report)
        with pytest.raises(AssertionError, match=rf"first divergence: {broken}"):
            assert_same_outputs(ours, ref, run)
    finally:
        weight.copy_(saved)
    assert assert_same_outputs(ours, ref, run) < 1e-5


def test_vae_pairs_and_modules_called_twice(tmp_path):
    ref = perturb(
        diffusers.AutoencoderKL(
            block_out_channels=(8, 16),
            norm_num_groups=4,
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        ).eval(),
        seed=6,
    )
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert module_pairs(ours, ref)["decoder.mid_block.attention"] == "decoder.mid_block.attentions.0"
    z1, z2 = torch.randn(1, 4, 5, 4), torch.randn(1, 4, 5, 4)
    report = compare_layers(
        ours, ref, lambda m: m.decode(torch.cat([m.decode(z1).sample[:, :1, ::2, ::2]] * 4, 1) + z2)
    )
    calls = [d.call for d in report.layers if d.name == "decoder.conv_out"]
    assert calls == [0, 1] and report.first_divergence is None, str(report)
