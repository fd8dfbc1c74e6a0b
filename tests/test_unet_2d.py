"""UNet2DModel (DDPM) parity with diffusers: tiny and real configs, every weight perturbed."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from conftest import DDPM_FLAVOUR, TINY_UNET_2D, perturb, reference_config, rel_err
from safetensors.torch import load_file, save_file

from minidiff import UNet2DModel
from weights_conversion import ConversionError

TINY = dict(TINY_UNET_2D, sample_size=16, block_out_channels=(32, 64), layers_per_block=2)
TINY_DDPM = dict(
    TINY,
    **DDPM_FLAVOUR,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    mid_block_scale_factor=1.5,
    center_input_sample=True,
)


def saved_reference(tmp_path, config: dict, seed: int = 0):
    ref = perturb(diffusers.UNet2DModel.from_config(config), seed).eval()
    ref.save_pretrained(tmp_path)
    return ref


def legacy_names(folder) -> None:
    """Rewrite a saved UNet2DModel with the pre-0.12 attention names (as google/ddpm-cat-256 has)."""
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    renamed = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        renamed[k] = v
    assert renamed.keys() != sd.keys()
    save_file(renamed, path)


@pytest.mark.parametrize("config", [TINY, TINY_DDPM], ids=["sd-style", "ddpm-style"])
def test_tiny_parity(tmp_path, config):
    ref = saved_reference(tmp_path, config)
    model = UNet2DModel.from_pretrained(tmp_path)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (0, 999, torch.tensor(17), torch.tensor([5, 500, 999]), 3.5):
            assert rel_err(model(x, t).sample, ref(x, t).sample) <= 1e-4, t
    assert model.config.sample_size == 16 and model.config["block_out_channels"] == config["block_out_channels"]


def test_class_conditional(tmp_path):
    ref = saved_reference(tmp_path, dict(TINY, num_class_embeds=10))
    model = UNet2DModel.from_pretrained(tmp_path)
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    with torch.no_grad():
        assert rel_err(model(x, 10, class_labels=labels).sample, ref(x, 10, class_labels=labels).sample) <= 1e-4
    with pytest.raises(ValueError, match="class_labels"):
        model(x, 10)


def test_legacy_attention_names_load_identically(tmp_path):
    ref = saved_reference(tmp_path, TINY_DDPM)
    legacy_names(tmp_path)
    model = UNet2DModel.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(model(x, 42).sample, ref(x, 42).sample) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("ddpm-cifar10-32", 32), ("ddpm-cat-256", 64)])
def test_real_config_parity(tmp_path, name, size):
    # ddpm-cat-256 runs at 64x64 to keep CI short: the weights and every layer are the real ones
    ref = saved_reference(tmp_path, reference_config(f"{name}.unet"))
    model = UNet2DModel.from_pretrained(tmp_path)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(x, 321).sample, ref(x, 321).sample) <= 1e-4


def test_save_pretrained_loads_in_diffusers_bit_exact(tmp_path):
    saved_reference(tmp_path / "ref", TINY_DDPM)
    ours = UNet2DModel.from_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "ref").state_dict()
    assert back.state_dict().keys() == theirs.keys()
    for k, v in back.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["_class_name"] == "UNet2DModel"


def test_missing_and_extra_keys_are_named(tmp_path):
    saved_reference(tmp_path, TINY)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    missing = dict(sd)
    del missing["down_blocks.1.attentions.0.to_k.weight"]
    save_file(missing, path)
    with pytest.raises(ConversionError, match=r"missing .*down_blocks\.1\.attentions\.0\.to_k\.weight"):
        UNet2DModel.from_pretrained(tmp_path)
    save_file({**sd, "mid_block.resnets.7.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ConversionError, match=r"unexpected .*mid_block\.resnets\.7\.conv1\.weight"):
        UNet2DModel.from_pretrained(tmp_path)
    save_file({**sd, "some_other_model.weight": torch.zeros(1)}, path)
    with pytest.raises(ConversionError, match=r"no rule .*some_other_model\.weight"):
        UNet2DModel.from_pretrained(tmp_path)
    wrong = dict(sd)
    wrong["conv_out.bias"] = torch.zeros(7)
    save_file(wrong, path)
    with pytest.raises(ConversionError, match=r"wrong shape .*conv_out\.bias"):
        UNet2DModel.from_pretrained(tmp_path)


def test_unsupported_block_type_is_named(tmp_path):
    saved_reference(tmp_path, TINY)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["down_block_types"] = ["SkipDownBlock2D", "AttnDownBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="SkipDownBlock2D"):
        UNet2DModel.from_pretrained(tmp_path)


def test_unknown_and_private_config_keys_are_tolerated(tmp_path):
    saved_reference(tmp_path, TINY)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update({"_name_or_path": "x", "some_future_key": 3})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert UNet2DModel.from_pretrained(tmp_path).config.layers_per_block == 2


def test_kwargs_construction_matches_config():
    model = UNet2DModel(**TINY)
    assert model.config.block_out_channels == (32, 64)
    assert model(torch.randn(1, 3, 16, 16), 3).sample.shape == (1, 3, 16, 16)
