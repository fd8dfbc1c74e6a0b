"""CLIPTextModel: the text encoder of Stable Diffusion (CLIP ViT-L/14 for SD1, OpenCLIP ViT-H for SD2);
CLIPTextModelWithProjection: SDXL's second text encoder (OpenCLIP ViT-bigG/14), which also projects
the pooled state.

References:
1. Radford et al. "Learning Transferable Visual Models From Natural Language Supervision", 2021
   (CLIP). https://arxiv.org/abs/2103.00020
2. Cherti et al. "Reproducible scaling laws for contrastive language-image learning", 2023
   (OpenCLIP, the SD2 text encoder). https://github.com/mlfoundations/open_clip
3. Radford et al. "Language Models are Unsupervised Multitask Learners", 2019 (GPT-2: the
   pre-LayerNorm causal transformer CLIP's text tower is built like).
4. transformers' CLIPTextModel, whose config keys, checkpoints and outputs this model reproduces.

Shape of the network: token embedding + learned position embedding -> N pre-LayerNorm blocks
(x + attn(ln1(x)) with a causal mask, then x + mlp(ln2(x))) -> final LayerNorm. The pooled output
is the final state at the end-of-text token. SD1 uses quick_gelu and 12 layers of width 768; SD2
uses gelu and 23 of width 1024 (OpenCLIP ViT-H has 24; SD2 conditions on the penultimate one, so
the last was dropped when it was converted). SDXL's bigG tower: gelu, 32 layers of width 1280, and
a bias-free `text_projection` of the pooled state (`text_embeds`, SDXL's pooled conditioning).

Deviation from transformers' names (mapped in weights_conversion/clip_text.py): the embeddings
and layers sit directly on the model (`token_embedding`, `layers.{i}`), not under
`text_model.embeddings` / `text_model.encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weights_conversion.clip_text import FORMAT, FORMAT_WITH_PROJECTION

from .config import ConfigBase
from .layers import Attention
from .modeling import ModelMixin
from .outputs import BaseOutput

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig(ConfigBase):
    """transformers' CLIPTextConfig keys; the defaults are Stable Diffusion 1.5's text encoder."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # SD's configs still carry eos_token_id=2 from before transformers fixed it; see `pooled_positions`
    eos_token_id: int = 2
    bos_token_id: int = 0
    pad_token_id: int = 1
    projection_dim: int = 768  # CLIPTextModelWithProjection's text_embeds width; unused by CLIPTextModel

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextModel: hidden_act={self.hidden_act!r} is not supported (supported: {ACTIVATIONS})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextModel: hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"CLIPTextModel: eos_token_id must be one integer, got {self.eos_token_id!r}")


@dataclass
class CLIPTextOutput(BaseOutput):
    """`[0]` / `.last_hidden_state`: final states after the final LayerNorm, (B, N, hidden_size).
    `.pooler_output`: the final state at the end-of-text token, (B, hidden_size); None when the
    model was given `inputs_embeds` (the token ids, hence the EOS position, are unknown).
    `.hidden_states`: the embeddings, then each layer's output, WITHOUT the final LayerNorm."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (ref. 1)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        d, heads = config.hidden_size, config.num_attention_heads
        self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attn = Attention(d, heads=heads, head_dim=d // heads, bias=True)
        self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # causal; with a padding mask, `mask` is the combined causal + padding mask
        x = x + self.self_attn(self.layer_norm1(x), causal=True, mask=mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(ModelMixin):
    """CLIP's text transformer. `model(input_ids)[0]` is what Stable Diffusion conditions on."""

    config_class = CLIPTextConfig
    weights_format = FORMAT
    # transformers' file names: model.safetensors, pytorch_model.bin
    weights_names = ("model", "pytorch_model")
    config: CLIPTextConfig

    def __init__(self, config: CLIPTextConfig | dict | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> CLIPTextOutput | tuple[torch.Tensor, ...]:
        """Encode token ids (B, N), or token embeddings (B, N, hidden_size) given as `inputs_embeds`.

        `inputs_embeds` replace only the token lookup: position embeddings are still added, so
        `model(inputs_embeds=model.token_embedding(ids))` equals `model(ids)` (less the pooled
        output). `attention_mask` (B, N), 1 = real token, 0 = padding, hides padded keys on top
        of the causal mask, as transformers does; Stable Diffusion passes none.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{type(self).__name__}: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            input_ids = self._check_ids(input_ids)
            x = self.token_embedding(input_ids)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"{type(self).__name__}: inputs_embeds must have shape (batch, sequence, "
                    f"{self.config.hidden_size}), got {tuple(inputs_embeds.shape)}"
                )
            x = inputs_embeds
        b, n = x.shape[:2]
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"{type(self).__name__}: the sequence has {n} tokens but the model has only "
                f"{self.config.max_position_embeddings} positions (truncate the prompt)"
            )
        # positions computed here, not stored: the model is built on the meta device, without buffers
        x = x + self.position_embedding(torch.arange(n, device=x.device))

        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, n):
                raise ValueError(
                    f"{type(self).__name__}: attention_mask must have shape {(b, n)}, got {tuple(attention_mask.shape)}"
                )
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, N, N)

        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last = self.final_layer_norm(x)

        pooled = None
        if input_ids is not None:
            pooled = last[torch.arange(b, device=last.device), self.pooled_positions(input_ids)]
        out = CLIPTextOutput(last, pooled, tuple(hidden_states) if output_hidden_states else None)
        return out if return_dict else out.to_tuple()

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token in each row of (B, N) ids.

        With eos_token_id == 2 (the configs of the original SD checkpoints, written before
        transformers corrected the id) the EOS is found as the largest id in the row, which holds
        for CLIP's vocabulary where <|endoftext|> is the last token; otherwise it is the first
        occurrence of eos_token_id (the pad token may equal EOS, so later ones are padding).
        """
        if self.config.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dtype.is_floating_point
            or input_ids.dtype == torch.bool
        ):
            raise ValueError(
                f"{type(self).__name__}: input_ids must be an integer tensor, "
                f"got {getattr(input_ids, 'dtype', type(input_ids))}"
            )
        if input_ids.ndim == 1:  # one unbatched prompt
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(
                f"{type(self).__name__}: input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"{type(self).__name__}: token ids must lie in [0, {self.config.vocab_size}), got ids from "
                f"{int(input_ids.min())} to {int(input_ids.max())} (tokenizer and text encoder mismatched?)"
            )
        return input_ids.to(self.token_embedding.weight.device)


@dataclass
class CLIPTextModelWithProjectionOutput(BaseOutput):
    """`[0]` / `.text_embeds`: the pooled end-of-text state through `text_projection`, (B, projection_dim);
    None when the model was given `inputs_embeds`. `.last_hidden_state`, `.hidden_states`: as CLIPTextOutput."""

    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CLIPTextModelWithProjection(CLIPTextModel):
    """The text transformer plus a bias-free projection of its pooled output (SDXL's text_encoder_2)."""

    weights_format = FORMAT_WITH_PROJECTION

    def __init__(self, config: CLIPTextConfig | dict | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.text_projection = nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> CLIPTextModelWithProjectionOutput | tuple[torch.Tensor, ...]:
        """As CLIPTextModel.forward; the pooled state comes back projected, as `text_embeds`."""
        out = super().forward(input_ids, attention_mask, inputs_embeds, output_hidden_states)
        pooled = out.pooler_output
        text_embeds = self.text_projection(pooled) if pooled is not None else None
        result = CLIPTextModelWithProjectionOutput(text_embeds, out.last_hidden_state, out.hidden_states)
        return result if return_dict else result.to_tuple()
