"""diffusers' loading / saving / pipeline API on minidiff, each behaviour against diffusers itself.

One tiny SD 1.x pipeline (every weight perturbed) is saved by diffusers once per module; the tests
load it through both libraries with the keywords diffusers' docs use, save it back sharded and in
variants, check `pipe.config` / `.components` / `from_pipe` / AutoPipeline* / `image_processor`, and
the attention API (processors, slicing switches, xformers without xformers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_sd
from PIL import Image

import minidiff
from minidiff.loading import _component_weight_patterns
from minidiff.modeling import parse_size
from minidiff.pipelines.auto import FAMILIES, TASKS, task_class

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("api") / "tiny-sd", "sd1")


@pytest.fixture(scope="module")
def pipe(folder):
    return minidiff.StableDiffusionPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    import diffusers

    return diffusers.StableDiffusionPipeline.from_pretrained(folder)


def _images(p, steps: int = 2, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    p.set_progress_bar_config(disable=True)
    out = p("a red circle", num_inference_steps=steps, height=32, width=32, generator=g, output_type="pt", **kw)
    return out.images


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- from_pretrained keywords ------------------------------------------------------------------


def test_docs_keywords_give_diffusers_image(folder, reference):
    """The quick tour's line: use_safetensors=True, dtype=, low_cpu_mem_usage, requires_safety_checker."""
    ours = minidiff.StableDiffusionPipeline.from_pretrained(
        folder,
        use_safetensors=True,
        dtype=torch.float32,
        low_cpu_mem_usage=False,
        requires_safety_checker=False,
        safety_checker=None,
        use_auth_token=None,
    )
    torch.testing.assert_close(_images(ours), _images(reference), atol=2e-5, rtol=0)
    half = minidiff.DiffusionPipeline.from_pretrained(folder, dtype=torch.float16, low_cpu_mem_usage=True)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.float16


def test_dtype_and_torch_dtype_together_refused_as_diffusers(folder):
    import diffusers

    for lib in (diffusers, minidiff):
        with pytest.raises(ValueError, match="dtype"):
            lib.StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        minidiff.UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", dtype=torch.float16, torch_dtype=torch.float32
        )
    with pytest.raises(TypeError, match="torch_dtype_typo"):
        minidiff.StableDiffusionPipeline.from_pretrained(folder, torch_dtype_typo=torch.float16)
    with pytest.raises(TypeError, match="in_channels"):
        minidiff.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", in_channels=9)


def test_use_safetensors(folder, tmp_path):
    """True: safetensors only (absent: an error naming the folder); False: pickles only; None: either."""
    import diffusers

    pickles = tmp_path / "pickles"
    diffusers.StableDiffusionPipeline.from_pretrained(folder).save_pretrained(pickles, safe_serialization=False)
    assert not list(pickles.glob("[uv]*/*.safetensors"))  # (transformers 5 writes safetensors whatever asked)
    ours = minidiff.StableDiffusionPipeline.from_pretrained(pickles)  # None: each component's format
    _same_weights(ours.unet, minidiff.UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    pickled = minidiff.UNet2DConditionModel.from_pretrained(pickles, subfolder="unet", use_safetensors=False)
    _same_weights(pickled, ours.unet)
    for lib in (diffusers, minidiff):  # both refuse with an OSError: unet pickles only, text encoder safetensors only
        for only in (True, False):
            with pytest.raises(OSError):
                lib.StableDiffusionPipeline.from_pretrained(pickles, use_safetensors=only)
    with pytest.raises(FileNotFoundError, match=rf"{pickles}/unet.*use_safetensors=True"):
        minidiff.UNet2DConditionModel.from_pretrained(pickles, subfolder="unet", use_safetensors=True)
    with pytest.raises(FileNotFoundError, match="use_safetensors=False"):
        minidiff.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=False)


def test_hub_keywords_through_the_cache(folder, tmp_path, hub_cache):
    """revision (a ref or a commit), token / use_auth_token, cache_dir, local_files_only, offline."""
    other = save_tiny_sd(tmp_path / "other", "sd1", seed=7)
    repo = hub_cache("owner/tiny-sd", folder)
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    (repo / "refs" / "v2").write_text(commit)
    shutil.copytree(other, repo / "snapshots" / commit)

    main = minidiff.StableDiffusionPipeline.from_pretrained("owner/tiny-sd", token="hf_x", use_safetensors=True)
    v2 = minidiff.DiffusionPipeline.from_pretrained("owner/tiny-sd", revision="v2", use_auth_token="hf_x")
    by_commit = minidiff.UNet2DConditionModel.from_pretrained("owner/tiny-sd", subfolder="unet", revision=commit)
    _same_weights(main.unet, minidiff.UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    _same_weights(v2.unet, minidiff.UNet2DConditionModel.from_pretrained(other, subfolder="unet"))
    _same_weights(by_commit, v2.unet)
    assert not torch.equal(main.unet.conv_in.weight, v2.unet.conv_in.weight)
    with pytest.raises(FileNotFoundError, match="owner/tiny-sd"):
        minidiff.StableDiffusionPipeline.from_pretrained("owner/tiny-sd", revision="no-such-ref")

    # cache_dir: a second cache the environment does not name
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(repo, elsewhere / repo.name, symlinks=True)
    shutil.rmtree(repo)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        minidiff.StableDiffusionPipeline.from_pretrained("owner/tiny-sd")
    pipe = minidiff.StableDiffusionPipeline.from_pretrained("owner/tiny-sd", cache_dir=elsewhere, local_files_only=True)
    _same_weights(pipe.unet, main.unet)
    assert pipe.config["_name_or_path"] == "owner/tiny-sd"


def test_missing_variant_refused_as_diffusers(folder):
    import diffusers

    for lib in (diffusers, minidiff):
        with pytest.raises((ValueError, OSError), match="fp16"):
            lib.StableDiffusionPipeline.from_pretrained(folder, variant="fp16")


def test_hub_download_picks_one_format_and_variant():
    """Online, diffusers downloads one weight format (safetensors first) and the asked variant only."""
    listing = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "text_encoder/pytorch_model.bin",
    ]
    pick = _component_weight_patterns
    assert pick("unet", listing, None, None) == ["unet/diffusion_pytorch_model.safetensors"]
    assert pick("unet", listing, False, None) == ["unet/diffusion_pytorch_model.bin"]
    assert pick("unet", listing, None, "fp16") == ["unet/diffusion_pytorch_model.fp16.safetensors"]
    assert pick("text_encoder", listing, None, "fp16") == listing[5:8]
    assert pick("text_encoder", listing, None, None) == ["text_encoder/pytorch_model.bin"]  # no plain safetensors
    assert pick("text_encoder", listing, True, None) == []
    assert pick("unet", None, None, None) == [
        "unet/*.safetensors",
        "unet/*.bin",
        "unet/*.safetensors.index*.json",
        "unet/*.bin.index*.json",
    ]


# -- save_pretrained -----------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_variant_save_loads_in_diffusers(pipe, reference, tmp_path, safe):
    import diffusers

    out = tmp_path / "saved"
    pipe.save_pretrained(out, safe_serialization=safe, variant="fp16", max_shard_size="60KB")
    ext = "safetensors" if safe else "bin"
    unet_files = sorted(p.name for p in (out / "unet").iterdir())
    assert f"diffusion_pytorch_model.{ext}.index.fp16.json" in unet_files
    assert any(n.startswith("diffusion_pytorch_model.fp16-00002-of-") for n in unet_files)
    stem = "model" if safe else "pytorch_model"  # transformers' names
    assert (out / "text_encoder" / f"{stem}.{ext}.index.fp16.json").is_file()
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(out, variant="fp16", use_safetensors=safe)
    for name in ("unet", "vae", "text_encoder"):
        _same_weights(getattr(theirs, name), getattr(reference, name))
    torch.testing.assert_close(_images(theirs), _images(reference), atol=0, rtol=0)
    back = minidiff.DiffusionPipeline.from_pretrained(out, variant="fp16")
    _same_weights(back.unet, pipe.unet)


def test_model_shards_sizes_and_stale_files(pipe, reference, tmp_path):
    import diffusers

    out = tmp_path / "unet"
    pipe.unet.save_pretrained(out)  # default: one file (diffusers' 10GB limit)
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    pipe.unet.save_pretrained(out, max_shard_size=50_000)  # int bytes; the single file must go
    names = sorted(p.name for p in out.iterdir())
    assert "diffusion_pytorch_model.safetensors" not in names
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = {p for p in names if p.endswith(".safetensors")}
    assert set(index["weight_map"].values()) == shards and len(shards) > 1
    _same_weights(diffusers.UNet2DConditionModel.from_pretrained(out), reference.unet)
    # diffusers' own shards read by minidiff
    reference.unet.save_pretrained(tmp_path / "theirs", max_shard_size="50KB")
    _same_weights(minidiff.UNet2DConditionModel.from_pretrained(tmp_path / "theirs"), pipe.unet)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    for bad in ("5 parsecs", 0, -1, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            pipe.unet.save_pretrained(tmp_path / "bad", max_shard_size=bad)
    assert not (tmp_path / "bad").exists()


# -- config, components, from_pipe, AutoPipeline -------------------------------------------------


def test_config_and_components_as_diffusers(pipe, reference):
    assert list(pipe.components) == list(reference.components)
    ours, theirs = dict(pipe.config), dict(reference.config)
    assert str(ours.pop("_name_or_path")) == str(theirs.pop("_name_or_path"))
    # diffusers adds these two when it saves (model_index.json has them); minidiff always shows them
    assert ours.pop("_class_name") == "StableDiffusionPipeline"
    assert ours.pop("_diffusers_version") == theirs.pop("_diffusers_version", "0.42.1")
    theirs.pop("_class_name", None)
    assert list(ours) == list(theirs)
    assert ours == theirs
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel")
    with pytest.raises(TypeError):
        pipe.config["unet"] = None


def test_settings_read_from_model_index(folder, tmp_path):
    """A setting the pipeline does not act on (requires_safety_checker: true) still shows in `config`."""
    import diffusers

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps(index | {"requires_safety_checker": True}))
    ours = minidiff.StableDiffusionPipeline.from_pretrained(copy)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(copy)
    assert ours.config.requires_safety_checker is theirs.config.requires_safety_checker is True
    assert minidiff.StableDiffusionImg2ImgPipeline.from_pipe(ours).config.requires_safety_checker is True
    ours.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["requires_safety_checker"] is True


def test_from_pipe_shares_modules(pipe, reference):
    import diffusers

    for lib in (minidiff, diffusers):
        base = pipe if lib is minidiff else reference
        img2img = lib.StableDiffusionImg2ImgPipeline.from_pipe(base)
        assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline"
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert getattr(img2img, name) is getattr(base, name)
        ddim = lib.DDIMScheduler.from_config(base.scheduler.config)
        swapped = lib.StableDiffusionPipeline.from_pipe(base, scheduler=ddim)
        assert swapped.scheduler is ddim and swapped.unet is base.unet and base.scheduler is not ddim
    ours = dict(minidiff.StableDiffusionImg2ImgPipeline.from_pipe(pipe).config)
    assert ours.keys() - {"_class_name", "_diffusers_version"} == dict(img2img.config).keys() - {
        "_class_name",
        "_diffusers_version",
    }
    with pytest.raises(TypeError, match="unet_typo"):
        minidiff.StableDiffusionPipeline.from_pipe(pipe, unet_typo=None)


@pytest.mark.parametrize("task", TASKS)
def test_auto_mapping_names_as_diffusers(task):
    from diffusers.pipelines import auto_pipeline as auto

    mapping = {
        "text-to-image": auto.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        "image-to-image": auto.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        "inpainting": auto.AUTO_INPAINT_PIPELINES_MAPPING,
    }[task]
    for family, names in FAMILIES.items():
        theirs = mapping.get(family)
        assert names[TASKS.index(task)] == (theirs.__name__ if theirs is not None else None), family


def test_auto_pipelines(pipe, reference, folder):
    import diffusers

    ours_current, theirs_current = pipe, reference
    for task in ("Image2Image", "Inpainting", "Text2Image"):
        ours = getattr(minidiff, f"AutoPipelineFor{task}").from_pipe(ours_current)
        theirs = getattr(diffusers, f"AutoPipelineFor{task}").from_pipe(theirs_current)
        assert type(ours).__name__ == type(theirs).__name__
        assert ours.unet is pipe.unet and ours.vae is pipe.vae and ours.tokenizer is pipe.tokenizer
        ours_current, theirs_current = ours, theirs
    assert type(ours_current) is minidiff.StableDiffusionPipeline
    loaded = minidiff.AutoPipelineForInpainting.from_pretrained(folder, use_safetensors=True)
    assert type(loaded) is minidiff.StableDiffusionInpaintPipeline
    assert type(minidiff.AutoPipelineForText2Image.from_pretrained(folder)) is minidiff.StableDiffusionPipeline
    with pytest.raises(OSError, match="from_pretrained"):
        minidiff.AutoPipelineForText2Image()
    with pytest.raises(ValueError, match="LatentConsistencyModelImg2ImgPipeline"):
        task_class("LatentConsistencyModelPipeline", "image-to-image")
    with pytest.raises(ValueError, match="inpainting"):
        task_class("LatentConsistencyModelPipeline", "inpainting")
    with pytest.raises(ValueError, match="DDPMPipeline"):
        minidiff.AutoPipelineForImage2Image.from_pipe(minidiff.DDPMPipeline.__new__(minidiff.DDPMPipeline))
    assert task_class("LatentConsistencyModelPipeline", "text-to-image") is minidiff.LatentConsistencyModelPipeline


# -- image_processor -------------------------------------------------------------------------------


def test_image_processor_matches_diffusers(pipe, reference):
    from diffusers.image_processor import VaeImageProcessor

    theirs, ours = reference.image_processor, pipe.image_processor
    assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 1.2
    for output_type in ("pt", "np", "latent"):
        a, b = ours.postprocess(x, output_type), theirs.postprocess(x, output_type)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(ours.postprocess(x), theirs.postprocess(x), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    a, b = ours.postprocess(x, "np", do_denormalize=[True, False]), theirs.postprocess(x, "np", [True, False])
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8))
    torch.testing.assert_close(ours.preprocess(picture), theirs.preprocess(picture), atol=0, rtol=0)
    torch.testing.assert_close(ours.preprocess(picture, 24, 32), theirs.preprocess(picture, 24, 32), atol=0, rtol=0)
    mask = Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8))
    mask_theirs = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    torch.testing.assert_close(pipe.mask_processor.preprocess(mask), mask_theirs.preprocess(mask), atol=0, rtol=0)
    array = VaeImageProcessor.pil_to_numpy([picture, picture])
    np.testing.assert_array_equal(minidiff.VaeImageProcessor.pil_to_numpy([picture, picture]), array)
    np.testing.assert_array_equal(
        minidiff.VaeImageProcessor.numpy_to_pt(array).numpy(), VaeImageProcessor.numpy_to_pt(array).numpy()
    )
    assert (
        minidiff.VaeImageProcessor.numpy_to_pil(array)[0].tobytes()
        == VaeImageProcessor.numpy_to_pil(array)[0].tobytes()
    )
    assert ours.get_default_height_width(picture) == theirs.get_default_height_width(picture)


# -- attention API ---------------------------------------------------------------------------------


def test_attention_processor_api(pipe, reference):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    unet = pipe.unet
    assert len(unet.attn_processors) == len(reference.unet.attn_processors)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    before = unet(x, 10, encoder_hidden_states=ctx).sample
    unet.set_attn_processor(AttnProcessor2_0())
    unet.set_attn_processor(AttnProcessor())
    unet.set_attn_processor(dict(reference.unet.attn_processors))  # one per layer, diffusers' keys
    unet.set_attn_processor(unet.attn_processors)
    unet.set_default_attn_processor()
    torch.testing.assert_close(unet(x, 10, encoder_hidden_states=ctx).sample, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="SlicedAttnProcessor"):
        unet.set_attn_processor(SlicedAttnProcessor(2))
    with pytest.raises(ValueError, match="attention layers"):
        unet.set_attn_processor({"a.processor": AttnProcessor2_0()})


def test_attention_slicing_switches_as_diffusers(pipe, reference):
    """ "auto" halves each layer's heads, "max" one, an int for all; the pipeline slices the UNet only."""
    from minidiff.layers import Attention

    def theirs(arg) -> list:
        reference.unet.set_attention_slice(arg)
        return sorted(getattr(p, "slice_size", None) for p in reference.unet.attn_processors.values())

    def ours(arg) -> list:
        pipe.unet.set_attention_slice(arg)
        return sorted(m.slice_size for m in pipe.unet.modules() if isinstance(m, Attention))

    try:
        for arg in ("auto", "max", 1):
            assert ours(arg) == theirs(arg), arg
        for lib_unet in (reference.unet, pipe.unet):
            with pytest.raises(ValueError, match="smaller or equal"):
                lib_unet.set_attention_slice(64)
        pipe.enable_attention_slicing()
        reference.enable_attention_slicing()
        assert sorted(m.slice_size for m in pipe.unet.modules() if isinstance(m, Attention)) == sorted(
            p.slice_size for p in reference.unet.attn_processors.values()
        )
        assert all(getattr(m, "slice_size", None) is None for m in pipe.vae.modules() if isinstance(m, Attention))
        pipe.disable_attention_slicing()
        assert all(m.slice_size is None for m in pipe.unet.modules() if isinstance(m, Attention))
    finally:
        pipe.unet.set_attention_slice(None)
        reference.unet.set_default_attn_processor()


def test_xformers_without_xformers_as_diffusers(pipe, reference):
    for target in (pipe, reference, pipe.unet, reference.unet):
        with pytest.raises(ModuleNotFoundError, match="xformers") as info:
            target.enable_xformers_memory_efficient_attention()
        assert info.value.name == "xformers"
    pipe.disable_xformers_memory_efficient_attention()


def test_sdxl_family_config_and_auto(tmp_path):
    """SDXL: diffusers' component keys and settings; AutoPipeline maps base <-> img2img <-> inpaint
    and a refiner's aesthetic-score setting survives a trip through the text-to-image class."""
    import diffusers
    from test_sdxl_pipelines import save_tiny_sdxl

    refiner_folder = save_tiny_sdxl(tmp_path / "refiner", "refiner")
    ours = minidiff.AutoPipelineForImage2Image.from_pretrained(refiner_folder)
    theirs = diffusers.AutoPipelineForImage2Image.from_pretrained(refiner_folder, add_watermarker=False)
    assert type(ours) is minidiff.StableDiffusionXLImg2ImgPipeline
    assert type(ours).__name__ == type(theirs).__name__
    assert set(ours.components) == set(theirs.components)  # (diffusers' order differs between its SDXL classes)
    config, reference = dict(ours.config), dict(theirs.config)
    for key in ("_name_or_path", "_class_name", "_diffusers_version"):
        config.pop(key), reference.pop(key, None)
    assert config == reference
    inpaint = minidiff.AutoPipelineForInpainting.from_pipe(ours)
    assert type(inpaint) is minidiff.StableDiffusionXLInpaintPipeline and inpaint.unet is ours.unet
    base = minidiff.AutoPipelineForText2Image.from_pipe(inpaint)
    assert type(base) is minidiff.StableDiffusionXLPipeline and base.text_encoder_2 is ours.text_encoder_2
    assert base.config["_requires_aesthetics_score"] is True  # kept aside, as diffusers does
    again = minidiff.AutoPipelineForImage2Image.from_pipe(base)
    assert again.requires_aesthetics_score is True and again.force_zeros_for_empty_prompt is False


def test_memory_switches_keep_diffusers_images(folder):
    """Sliced attention on the UNet, a tiled and sliced VAE decode: diffusers' image for the same switches."""
    import diffusers

    ours = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ours.enable_attention_slicing("max")
    ours.enable_vae_tiling()
    ours.enable_vae_slicing()
    assert ours.vae.use_tiling and ours.vae.use_slicing
    theirs.enable_attention_slicing("max")
    theirs.vae.enable_tiling()
    theirs.vae.enable_slicing()

    def run(p) -> torch.Tensor:  # 64 x 64: latents of 32, past the tiny VAE's 16-latent tile
        g = torch.Generator().manual_seed(0)
        p.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=2, height=64, width=64, generator=g, num_images_per_prompt=2, output_type="pt")
        return p("a red circle", **kw).images

    tiled = run(ours)
    torch.testing.assert_close(tiled, run(theirs), atol=1e-4, rtol=0)
    ours.disable_vae_tiling()
    ours.disable_vae_slicing()
    ours.disable_attention_slicing()
    assert not ours.vae.use_tiling and not ours.vae.use_slicing
    assert (run(ours) - tiled).abs().max() > 1e-3  # the tiles were really blended
