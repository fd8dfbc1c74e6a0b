"""CLIPTextModel parity against transformers, through real transformers-saved folders.

Every test builds transformers' CLIPTextModel, perturbs every weight, saves it with transformers'
own save_pretrained and loads that folder with minidiff's from_pretrained (the real converter).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import clip_config, perturb, reference_config, rel_err
from safetensors.torch import load_file, save_file

from minidiff.clip_text import CLIPTextConfig, CLIPTextModel
from weights_conversion import ConversionError
from weights_conversion.clip_text import FORMAT

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# a 100-id vocabulary, 16 positions; BOS / EOS ids off the usual 0 / 2
TINY = clip_config(32, 3, 4, vocab_size=100, max_position_embeddings=16, hidden_act="quick_gelu", projection_dim=16)
TINY |= dict(bos_token_id=97, eos_token_id=60, pad_token_id=1)


def reference_model(seed: int = 0, **config) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    return perturb(model.eval(), seed)


def save_reference(ref: torch.nn.Module, path) -> None:
    ref.save_pretrained(path)
    assert (path / "model.safetensors").is_file()


@torch.no_grad()
def run_both(ref, ours, ids, **kwargs):
    return ref(ids, output_hidden_states=True, **kwargs), ours(ids, output_hidden_states=True, **kwargs)


def assert_parity(a, b, what: str = "") -> None:
    """All states of our output `a` against transformers' `b`."""
    assert a.last_hidden_state.shape == b.last_hidden_state.shape
    assert len(a.hidden_states) == len(b.hidden_states)
    errors = {
        "last_hidden_state": rel_err(a.last_hidden_state, b.last_hidden_state),
        "penultimate": rel_err(a.hidden_states[-2], b.hidden_states[-2]),
        "pooler_output": rel_err(a.pooler_output, b.pooler_output),
        **{f"hidden_states[{i}]": rel_err(x, y) for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states))},
    }
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{what}: relative error above {TOL}: {bad}"


def sd_ids(batch_eos: list[int], length: int, vocab: int, bos: int, eos: int, pad: int, seed: int = 0) -> torch.Tensor:
    """Tokenizer-like rows: BOS, random words, EOS at the given position, padding after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(batch_eos), length), pad, dtype=torch.long)
    for row, pos in enumerate(batch_eos):
        ids[row, 0] = bos
        ids[row, 1:pos] = torch.randint(2, min(bos, eos), (pos - 1,), generator=g)
        ids[row, pos] = eos
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip_tiny")
    ref = reference_model(**TINY)
    save_reference(ref, path)
    return ref, CLIPTextModel.from_pretrained(path), path


# ---------------------------------------------------------------- parity at the tiny config


def test_tiny_parity_eos_at_different_positions(tiny):
    ref, ours, _ = tiny
    # EOS (60) first at 1, 7, 15; a larger id (97/99) after it, so "argmax" pooling would be wrong here
    ids = sd_ids([1, 7, 15], 16, 100, bos=97, eos=60, pad=60)
    ids[0, 3] = 99
    ids[1, 9] = 99
    a, b = run_both(ref, ours, ids)
    assert_parity(a, b, "tiny")
    assert torch.equal(a.pooler_output, a.last_hidden_state[torch.arange(3), torch.tensor([1, 7, 15])])
    assert len(a.hidden_states) == TINY["num_hidden_layers"] + 1


def test_tiny_parity_short_sequence_and_unbatched(tiny):
    ref, ours, _ = tiny
    ids = sd_ids([4, 5], 6, 100, bos=97, eos=60, pad=1)
    a, b = run_both(ref, ours, ids)
    assert_parity(a, b, "short")
    with torch.no_grad():
        single = ours(ids[1])
    assert torch.allclose(single.last_hidden_state[0], a.last_hidden_state[1], atol=1e-6)


def test_legacy_eos_token_id_2_pools_at_argmax(tmp_path):
    # the original SD configs say eos_token_id=2: transformers then pools at the largest id
    ref = reference_model(seed=1, **{**TINY, "eos_token_id": 2})
    save_reference(ref, tmp_path)
    ours = CLIPTextModel.from_pretrained(tmp_path)
    assert ours.config.eos_token_id == 2
    ids = sd_ids([5, 9], 12, 100, bos=50, eos=99, pad=99)
    ids[:, 2] = 2  # an id equal to eos_token_id: the first-EOS rule would pool here
    a, b = run_both(ref, ours, ids)
    assert_parity(a, b, "eos_token_id=2")
    assert torch.equal(a.pooler_output, a.last_hidden_state[torch.arange(2), torch.tensor([5, 9])])


def test_gelu_tiny_parity(tmp_path):
    ref = reference_model(seed=2, **{**TINY, "hidden_act": "gelu"})
    save_reference(ref, tmp_path)
    ours = CLIPTextModel.from_pretrained(tmp_path)
    a, b = run_both(ref, ours, sd_ids([3, 10], 16, 100, bos=97, eos=60, pad=0))
    assert_parity(a, b, "gelu")


def test_attention_mask_parity(tiny):
    ref, ours, _ = tiny
    ids = sd_ids([5, 9, 15], 16, 100, bos=97, eos=60, pad=1)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mask[1, :3] = 0  # left padding: the first queries see no key at all
    mask[2, 4:8] = 0  # a hole
    a, b = run_both(ref, ours, ids, attention_mask=mask)
    assert_parity(a, b, "attention_mask")
    # the mask must change something, or this test would prove nothing
    with torch.no_grad():
        unmasked = ours(ids).last_hidden_state
    assert rel_err(unmasked[0, 6:], a.last_hidden_state[0, 6:]) > 1e-3


def test_return_tuple_like_transformers(tiny):
    ref, ours, _ = tiny
    ids = sd_ids([4, 8], 16, 100, bos=97, eos=60, pad=60)
    with torch.no_grad():
        a, b = ours(ids, return_dict=False), ref(ids, return_dict=False)
        assert len(a) == len(b) == 2
        assert ours(ids, output_hidden_states=True, return_dict=False)[2][0].shape == (2, 16, 32)
        out = ours(ids)
    assert out[0] is out.last_hidden_state and out[1] is out.pooler_output and out.hidden_states is None


def test_inputs_embeds_equal_ids_path(tiny):
    _, ours, _ = tiny
    ids = sd_ids([4, 8], 16, 100, bos=97, eos=60, pad=60)
    with torch.no_grad():
        by_ids = ours(ids, output_hidden_states=True)
        by_embeds = ours(inputs_embeds=ours.get_input_embeddings()(ids), output_hidden_states=True)
    assert ours.get_input_embeddings() is ours.token_embedding
    assert torch.equal(by_embeds.last_hidden_state, by_ids.last_hidden_state)
    assert all(torch.equal(x, y) for x, y in zip(by_embeds.hidden_states, by_ids.hidden_states))
    # position embeddings are added to inputs_embeds, as transformers' CLIPTextEmbeddings does
    assert torch.equal(by_embeds.hidden_states[0], ours.token_embedding(ids) + ours.position_embedding.weight[:16])
    # without ids the EOS position is unknown: no pooled output
    assert by_embeds.pooler_output is None


def test_token_embedding_mixing_like_the_tutorial(tiny):
    _, ours, _ = tiny
    ids = sd_ids([6], 16, 100, bos=97, eos=60, pad=60)
    with torch.no_grad():
        emb = ours.token_embedding(ids)
        emb[0, 3] = 0.5 * ours.token_embedding(torch.tensor(10)) + 0.5 * ours.token_embedding(torch.tensor(20))
        mixed = ours(inputs_embeds=emb)[0]
        plain = ours(ids)[0]
    assert torch.equal(mixed[0, :3], plain[0, :3])  # causal: earlier tokens do not see the change
    assert not torch.allclose(mixed[0, 3:], plain[0, 3:])


# ---------------------------------------------------------------- checkpoint layouts


@pytest.mark.parametrize("prefix", ["text_model.", ""])
def test_checkpoint_with_or_without_prefix_and_position_ids_loads_identically(tiny, tmp_path, prefix):
    _, ours, path = tiny
    sd = load_file(str(path / "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in sd)  # transformers 5 writes no prefix
    # transformers 4 (every real SD checkpoint) prefixes `text_model.`; old saves add position_ids
    old = {f"{prefix}{k}": v for k, v in sd.items()}
    old[f"{prefix}embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    save_file(old, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    theirs, mine = loaded.state_dict(), ours.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)


def test_full_clip_model_folder_loads_text_tower(tmp_path):
    # e.g. openai/clip-vit-large-patch14: nested text_config, vision weights to skip
    tcfg = dict(TINY)
    vcfg = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = transformers.CLIPModel(transformers.CLIPConfig(text_config=tcfg, vision_config=vcfg, projection_dim=16))
    perturb(full.eval(), 3).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip"
    ours = CLIPTextModel.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    assert ours.config.hidden_size == 32 and ours.config.eos_token_id == 60
    a, b = run_both(ref, ours, sd_ids([4, 12], 16, 100, bos=97, eos=60, pad=60))
    assert_parity(a, b, "full CLIPModel folder")
    assert torch.equal(ours.final_layer_norm.weight, full.text_model.final_layer_norm.weight)


@pytest.mark.parametrize("safe", [True, False])
def test_save_pretrained_loads_bit_exact_in_transformers(tiny, tmp_path, safe):
    ref, ours, _ = tiny
    ours.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"
    assert "_class_name" not in config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.CLIPTextModel.from_pretrained(tmp_path)
    expected, got = ref.state_dict(), back.state_dict()
    assert expected.keys() == got.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "hidden_act", "layer_norm_eps", "num_hidden_layers"):
        assert getattr(back.config, key) == getattr(ref.config, key), key
    # and minidiff reads its own folder back
    again = CLIPTextModel.from_pretrained(tmp_path)
    assert again.config == ours.config


def test_torch_dtype(tiny):
    _, _, path = tiny
    half = CLIPTextModel.from_pretrained(path, torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and half.device.type == "cpu"


# ---------------------------------------------------------------- the real SD text encoders


@pytest.fixture(scope="module", params=["sd-v1-5", "sd-v2-1"])
def real(request, tmp_path_factory):
    raw = reference_config(f"{request.param}.text_encoder")
    path = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(raw))
    perturb(ref.eval(), seed=4)
    save_reference(ref, path)
    ours = CLIPTextModel.from_pretrained(path)
    # SD1 pads with <|endoftext|> (49407), SD2 with "!" (0)
    pad = 49407 if request.param == "sd-v1-5" else 0
    ids = sd_ids([9, 76], 77, raw["vocab_size"], bos=49406, eos=49407, pad=pad)
    yield request.param, raw, ref, ours, ids
    del ref, ours


@pytest.mark.slow
def test_real_config_parity(real):
    name, raw, ref, ours, ids = real
    assert (ours.config.hidden_act, ours.config.num_hidden_layers, ours.config.hidden_size) == (
        raw["hidden_act"],
        raw["num_hidden_layers"],
        raw["hidden_size"],
    )
    assert ours.config.eos_token_id == 2  # the original SD configs: argmax pooling
    a, b = run_both(ref, ours, ids)
    assert_parity(a, b, name)
    assert torch.equal(a.pooler_output, a.last_hidden_state[torch.arange(2), torch.tensor([9, 76])])


@pytest.mark.slow
def test_real_config_attention_mask_parity(real):
    name, _, ref, ours, ids = real
    mask = (torch.arange(77)[None] <= torch.tensor([9, 76])[:, None]).long()
    a, b = run_both(ref, ours, ids, attention_mask=mask)
    assert_parity(a, b, f"{name} with attention_mask")


# ---------------------------------------------------------------- bad input


def test_bad_inputs(tiny):
    _, ours, _ = tiny
    ids = sd_ids([4, 8], 16, 100, bos=97, eos=60, pad=60)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\)"):
        ours(ids + 50)
    with pytest.raises(ValueError, match="token ids must lie"):
        ours(torch.where(ids == 97, -1, ids))
    with pytest.raises(ValueError, match="16 positions"):
        ours(torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="16 positions"):
        ours(inputs_embeds=torch.zeros(1, 17, 32))
    with pytest.raises(ValueError, match="exactly one of"):
        ours()
    with pytest.raises(ValueError, match="exactly one of"):
        ours(ids, inputs_embeds=ours.token_embedding(ids))
    with pytest.raises(ValueError, match="integer tensor"):
        ours(ids.float())
    with pytest.raises(ValueError, match="integer tensor"):
        ours([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"shape \(batch, sequence\)"):
        ours(ids[None])
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        ours(inputs_embeds=torch.zeros(2, 16, 31))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ours(ids, attention_mask=torch.ones(2, 15))


def test_bad_configs():
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="not a multiple"):
        CLIPTextConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="clip_vision_model"):
        FORMAT.config_from_dict(CLIPTextConfig, {"model_type": "clip_vision_model", "hidden_size": 32})
    with pytest.raises(ValueError, match="eos_token_id must be one integer"):
        FORMAT.config_from_dict(CLIPTextConfig, {"eos_token_id": [2, 3]})


def test_config_translation():
    # keys a config leaves out take transformers' defaults, not minidiff's SD1.5 ones
    assert FORMAT.config_from_dict(CLIPTextConfig, {}).eos_token_id == 49407
    assert FORMAT.config_from_dict(CLIPTextConfig, {}).hidden_size == 512
    assert FORMAT.config_from_dict(CLIPTextConfig, reference_config("sd-v2-1.text_encoder")) == CLIPTextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=512,
    )
    # the old CLIPConfig spelling: `text_config_dict` wins over `text_config`
    nested = {"model_type": "clip", "text_config": {"hidden_size": 64}, "text_config_dict": {"hidden_size": 768}}
    assert FORMAT.config_from_dict(CLIPTextConfig, nested).hidden_size == 768
    assert CLIPTextModel(config=reference_config("sd-v1-5.text_encoder")).config == CLIPTextConfig()


def test_strict_conversion_names_the_bad_key(tiny):
    _, _, path = tiny
    sd = load_file(str(path / "model.safetensors"))
    config = FORMAT.config_from_dict(CLIPTextConfig, json.loads((path / "config.json").read_text()))
    with pytest.raises(ConversionError, match=r"no rule for 1 key\(s\): pooler\.dense\.weight"):
        CLIPTextModel.from_foreign_state_dict(config, {**sd, "pooler.dense.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"unexpected 1 key\(s\): layers\.0\.self_attn\.extra_proj\.weight"):
        CLIPTextModel.from_foreign_state_dict(
            config, {**sd, "encoder.layers.0.self_attn.extra_proj.weight": torch.zeros(1)}
        )
    with pytest.raises(ConversionError, match=r"both map to 'final_layer_norm\.weight'"):
        CLIPTextModel.from_foreign_state_dict(config, {**sd, "text_model.final_layer_norm.weight": torch.zeros(32)})
    del sd["encoder.layers.2.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing 1 key\(s\): layers\.2\.mlp\.fc2\.bias"):
        CLIPTextModel.from_foreign_state_dict(config, sd)
