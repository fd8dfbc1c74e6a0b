"""The base class of every minidiff model: from_pretrained / save_pretrained and output types.

Loading is: read the foreign config -> dataclass config (the model's `weights_format`, a
weights_conversion.ModelFormat, handed the model's `config_class`), build the model on the meta
device (no memory, no random init), read the weights (minidiff.loading), rename them with the
strict converter against the meta model's exact keys and shapes, then
`load_state_dict(strict=True, assign=True)`, which adopts the loaded tensors instead of copying.
Original LDM single files go through minidiff.ldm_file, which needs only the class.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch
from torch import nn

from weights_conversion import ModelFormat

from . import fast, files, ldm_file
from .loading import find_weight_files, load_config, read_state_dict


class ModelMixin(nn.Module):
    """Config handling, loading and saving shared by all models."""

    config_class: ClassVar[type]
    weights_format: ClassVar[ModelFormat]  # how the class is stored by diffusers / transformers
    # weight file stems, tried in order when loading; saving names safetensors after the first and
    # pickles after the last (transformers: model.safetensors but pytorch_model.bin)
    weights_names: ClassVar[tuple[str, ...]] = ("diffusion_pytorch_model",)
    config_name: ClassVar[str] = "config.json"

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config object or keyword arguments, not both")
        elif isinstance(config, dict):
            config = self._config_from_dict(config)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def __getattr__(self, name: str) -> Any:
        # diffusers code reads config values off the model too (`unet.in_channels`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in config:
                return config[name]
            raise

    @classmethod
    def _config_from_dict(cls, raw: dict[str, Any]) -> Any:
        """A foreign (diffusers / transformers) JSON config -> this class's config dataclass."""
        return cls.weights_format.config_from_dict(cls.config_class, raw)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        **unused: Any,
    ):
        """Load a diffusers / transformers folder (or Hub id): config, then one weight format."""
        where = str(pretrained_model_name_or_path) + (f"/{subfolder}" if subfolder else "")
        raw = load_config(pretrained_model_name_or_path, subfolder, cls.config_name, local_files_only)
        config = cls._config_from_dict(raw)
        files = find_weight_files(
            pretrained_model_name_or_path, subfolder, cls.weights_names, variant, local_files_only
        )
        state_dict = read_state_dict(files)
        return cls.from_foreign_state_dict(config, state_dict, torch_dtype, what=f"{cls.__name__} weights in {where}")

    @classmethod
    def from_foreign_state_dict(
        cls,
        config: Any,
        state_dict: dict[str, torch.Tensor],
        torch_dtype: torch.dtype | None = None,
        what: str = "",
        fmt: ModelFormat | None = None,
    ):
        """Build on the meta device, rename strictly against its exact keys/shapes, adopt the tensors.
        `fmt` is another weights_conversion format than the class's own (e.g. the LDM single-file one)."""
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        converted = (fmt or cls.weights_format).convert(state_dict, config, expected, what or cls.__name__)
        return model._adopt(converted, torch_dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        use_ema: bool | None = None,
        prediction_type: str | None = None,
    ):
        """Load this model out of an original CompVis / LDM single file (.safetensors or .ckpt),
        its config inferred from the tensors' shapes, offline. See minidiff.ldm_file."""
        return ldm_file.load_model(cls, path, torch_dtype=torch_dtype, use_ema=use_ema, prediction_type=prediction_type)

    def _adopt(self, state_dict: dict[str, torch.Tensor], torch_dtype: torch.dtype | None):
        # diffusers loads in float32 unless told otherwise, whatever the file's dtype
        dtype = torch_dtype or torch.float32
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        self.load_state_dict(state_dict, strict=True, assign=True)
        return fast.apply(self.eval().requires_grad_(False))  # CPU speed-ups, same maths (minidiff/fast.py)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        overwrite: bool | None = None,
    ) -> None:
        """Write config.json + weights in the diffusers / transformers layout (loadable by them).
        Every file is written atomically; `overwrite` as minidiff.files.output_folder: None writes into
        an existing folder as diffusers does, True replaces the whole folder, False refuses one."""
        fmt = self.weights_format
        state_dict = {k: v.detach().contiguous() for k, v in fmt.export(self.state_dict(), self.config).items()}
        stem = self.weights_names[0] if safe_serialization else self.weights_names[-1]
        name = stem + (f".{variant}" if variant else "")
        config = json.dumps(fmt.config_to_dict(self.config), indent=2, sort_keys=True) + "\n"
        with files.output_folder(save_directory, overwrite, marker=self.config_name) as out:
            if safe_serialization:
                from safetensors.torch import save_file

                with files.atomic_file(out / f"{name}.safetensors") as tmp:
                    save_file(state_dict, str(tmp), metadata={"format": "pt"})
            else:
                files.torch_save(state_dict, out / f"{name}.bin")
            files.write_text(out / self.config_name, config)
