"""from_pretrained plumbing: weight formats, variants, shards, the offline Hub cache, bad files."""

from __future__ import annotations

import copy
import os
import pickle
import shutil

import diffusers
import pytest
import torch
from conftest import TINY_UNET_2D, perturb
from safetensors.torch import load_file

from minidiff import UNet2DModel
from minidiff.loading import CheckpointError, read_tensors

TINY = TINY_UNET_2D


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    model = perturb(diffusers.UNet2DModel(**TINY)).eval()
    model.save_pretrained(folder)
    return model, folder


def _export(model: UNet2DModel) -> dict:
    return model.weights_format.export(model.state_dict(), model.config)


def assert_loads_reference(model: UNet2DModel, ref) -> None:
    ref_sd = ref.state_dict()
    exported = _export(model)
    assert exported.keys() == ref_sd.keys()
    for k, v in exported.items():
        assert torch.equal(v.float(), ref_sd[k].float()), k


def test_meta_build_then_assign(reference):
    ref, folder = reference
    model = UNet2DModel.from_pretrained(folder)
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert_loads_reference(model, ref)


def test_bin_pickle_and_safetensors_preference(reference, tmp_path):
    ref, _ = reference
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    assert_loads_reference(UNet2DModel.from_pretrained(tmp_path), ref)
    # with both present, safetensors wins: make the pickle unreadable to prove it is not touched
    ref.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80garbage")
    assert_loads_reference(UNet2DModel.from_pretrained(tmp_path), ref)


def test_fp16_variant_and_torch_dtype(reference, tmp_path):
    ref = copy.deepcopy(reference[0]).half()
    ref.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        UNet2DModel.from_pretrained(tmp_path)  # no plain file: the variant must be asked for
    model = UNet2DModel.from_pretrained(tmp_path, variant="fp16")
    assert model.dtype == torch.float32  # loaded in fp32 unless torch_dtype says otherwise, like diffusers
    assert_loads_reference(model, ref)
    assert UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16).dtype == torch.float16


def test_sharded_checkpoint(reference, tmp_path):
    ref, _ = reference
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_loads_reference(UNet2DModel.from_pretrained(tmp_path), ref)


def test_hub_id_from_offline_cache(reference, tmp_path, hub_cache):
    ref, folder = reference
    pipeline_folder = tmp_path / "pipe"
    shutil.copytree(folder, pipeline_folder / "unet")
    (pipeline_folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never fetched")
    hub_cache("google/ddpm-tiny", pipeline_folder)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model = UNet2DModel.from_pretrained("google/ddpm-tiny", subfolder="unet")
    assert_loads_reference(model, ref)
    with pytest.raises(FileNotFoundError, match=r"google/ddpm-other.*not in the local Hugging Face cache.*offline"):
        UNet2DModel.from_pretrained("google/ddpm-other", subfolder="unet")


def test_not_a_folder_nor_hub_id():
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hugging Face Hub id"):
        UNet2DModel.from_pretrained("/no/such/folder/anywhere")


def test_folder_without_weights(reference, tmp_path):
    shutil.copy(reference[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=rf"no weights in {tmp_path}.*diffusion_pytorch_model.safetensors"):
        UNet2DModel.from_pretrained(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet2DModel.from_pretrained(tmp_path)


def test_broken_config_json(reference, tmp_path):
    shutil.copytree(reference[1], tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        UNet2DModel.from_pretrained(tmp_path)


def test_truncated_safetensors(reference, tmp_path):
    shutil.copytree(reference[1], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors is not a valid safetensors file"):
        UNet2DModel.from_pretrained(tmp_path)


def test_lfs_pointer(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        read_tensors(path)


def test_pickle_named_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="named .safetensors but holds a pickle"):
        read_tensors(path)


class _Canary:
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    canary = _Canary()
    canary.path = tmp_path / "pwned"
    path = tmp_path / "diffusion_pytorch_model.bin"
    with open(path, "wb") as f:
        torch.save({"w": torch.zeros(1), "payload": canary}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_tensors(path)
    assert not canary.path.exists()
    # and a raw (non-zip) pickle
    path.write_bytes(pickle.dumps(canary, protocol=2))
    with pytest.raises(CheckpointError):
        read_tensors(path)
    assert not canary.path.exists()


def test_failed_load_leaves_nothing_half_loaded(reference, tmp_path):
    """A converter error raises before any model exists: there is no object to misuse."""
    shutil.copytree(reference[1], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd.pop("conv_in.weight")
    from safetensors.torch import save_file

    save_file(sd, path)
    with pytest.raises(ValueError, match="conv_in.weight"):
        UNet2DModel.from_pretrained(tmp_path)
