"""The only place in minidiff that knows foreign checkpoint key names and config formats.

Each model has a module here defining `FORMAT`, a `ModelFormat`: its rename rules (foreign ->
minidiff), the keys deliberately dropped, and its config translation both ways. The model class
holds it as `weights_format`; `minidiff.modeling` does the rest.

This package imports nothing from minidiff: it is handed the model's config dataclass
(`FORMAT.config_from_dict(UNet2DConditionConfig, raw)`), so the models can import their formats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .rules import ConversionError, Rule, check_exact, convert, export, same

__all__ = ["ConversionError", "ModelFormat", "Rule", "check_exact", "convert", "export", "same"]


@dataclass(frozen=True)
class ModelFormat:
    """How one model class is stored in a foreign (diffusers / transformers) folder."""

    class_name: str  # the `_class_name` written into config.json
    rules: Callable[[Any], list[Rule]]  # config -> rename rules (rules may depend on the config)
    config_from_dict: Callable[[type, Mapping[str, Any]], Any]  # (config class, foreign JSON) -> config
    config_to_dict: Callable[[Any], dict[str, Any]]
    ignore: tuple[str, ...] = ()  # source key templates dropped on purpose
    # optional whole-dict rewrites around the renaming (e.g. splitting a fused tensor)
    before_convert: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = field(default=None)
    after_export: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = field(default=None)

    def convert(
        self, state_dict: Mapping[str, torch.Tensor], config: Any, expected: Mapping[str, torch.Size], what: str
    ) -> dict[str, torch.Tensor]:
        sd = dict(state_dict)
        if self.before_convert is not None:
            sd = self.before_convert(sd, config)
        return convert(sd, self.rules(config), expected, self.ignore, what)

    def export(self, state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        sd = export(state_dict, self.rules(config), what=self.class_name)
        if self.after_export is not None:
            sd = self.after_export(sd, config)
        return sd
