"""CPU offload on a machine without an accelerator: refused as diffusers refuses it; with an explicit
device, the hooks move weights and inputs to it around each forward and give the same images.

There is no GPU here, so the movement is shown on the "meta" device (a tensor there has a shape and
no data: a model that computed there has its weights there) and the numbers on an explicit "cpu".
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_sd

import minidiff
from minidiff.pipelines.offload import ModelOffload, SequentialOffload

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("offload") / "tiny-sd", "sd1")


@pytest.fixture
def pipe(folder):
    p = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def _images(p) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return p("a red circle", num_inference_steps=2, height=32, width=32, generator=g, output_type="pt").images


def _hook_count(p) -> int:
    modules = [m for c in (p.unet, p.vae, p.text_encoder) for m in c.modules()]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def test_no_accelerator_refused_as_diffusers(folder, pipe):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        if torch.accelerator.is_available():  # (a GPU runner) both pick the accelerator
            getattr(reference, method)()
            getattr(pipe, method)()
            assert pipe.device == reference._execution_device
            reference.remove_all_hooks()
            pipe.remove_all_hooks()
            continue
        with pytest.raises(RuntimeError) as theirs:
            getattr(reference, method)()
        with pytest.raises(RuntimeError) as ours:
            getattr(pipe, method)()
        assert str(ours.value) == str(theirs.value)
        for lib_pipe in (reference, pipe):  # a device index twice: both refuse before touching a device
            with pytest.raises(ValueError, match="gpu_id"):
                getattr(lib_pipe, method)(gpu_id=1, device="cuda:1")
    assert getattr(pipe, "_offload", None) is None


@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_explicit_device_same_images_and_undo(pipe, method):
    expected = _images(pipe)
    hooks = _hook_count(pipe)  # (minidiff/fast.py adds two of its own to the VAE decoder)
    getattr(pipe, method)(device="cpu")
    assert _hook_count(pipe) > hooks or method == "enable_model_cpu_offload"
    assert pipe.device == pipe._execution_device == torch.device("cpu")
    torch.testing.assert_close(_images(pipe), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="remove_all_hooks"):
        pipe.to("cpu")
    pipe.maybe_free_model_hooks()
    pipe.remove_all_hooks()
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert "forward" not in model.__dict__ and "decode" not in model.__dict__
    assert _hook_count(pipe) == hooks
    torch.testing.assert_close(_images(pipe), expected, atol=0, rtol=0)


def test_model_offload_one_model_at_a_time(pipe, monkeypatch):
    """The order the models come up in a call (diffusers' text_encoder->unet->vae), each offloading the last."""
    pipe.enable_model_cpu_offload(device="cpu")
    loaded: list[str] = []
    names = {id(m): n for n, m in pipe.components.items()}
    original = ModelOffload.load

    def spy(self, model):
        loaded.append(names[id(model)])
        original(self, model)

    monkeypatch.setattr(ModelOffload, "load", spy)
    _images(pipe)
    moves = [n for i, n in enumerate(loaded) if i == 0 or loaded[i - 1] != n]
    assert moves == ["text_encoder", "unet", "vae"]
    # the call ends with maybe_free_model_hooks, as diffusers': no model left on the accelerator
    assert pipe._offload.active is None
    pipe.remove_all_hooks()


def test_weights_and_inputs_move_to_the_device(pipe):
    """On "meta": a hooked model computes where its weights were moved, inputs follow them, and the
    sequential hooks put every layer back on the CPU with its values unchanged."""
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)

    seq = SequentialOffload([unet], torch.device("meta"))
    out = unet(x, 10, encoder_hidden_states=ctx).sample
    assert out.device.type == "meta"  # computed on the device, though every input came from the CPU
    assert all(t.device.type == "cpu" for t in unet.state_dict().values())
    seq.remove()
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m._forward_pre_hooks for m in unet.modules())

    model = ModelOffload([pipe.text_encoder, unet], torch.device("meta"))
    out = unet(x, 10, encoder_hidden_states=ctx).sample
    assert out.device.type == "meta" and unet.conv_in.weight.device.type == "meta"
    assert pipe.text_encoder.device.type == "cpu"
    model.active = None  # (meta holds no values to bring back; a real accelerator does)
    model.remove()
    assert "forward" not in unet.__dict__
