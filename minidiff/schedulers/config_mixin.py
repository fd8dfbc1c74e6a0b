"""The config side of every scheduler, as diffusers' ConfigMixin / SchedulerMixin present it.

`Cls(**keys)` checks the keys against `config_class` (config.py) and keeps them in `.config`, a
FrozenDict; `from_config` / `from_pretrained` / `save_pretrained` (alias `save_config`) move configs
between classes and to and from scheduler_config.json; `compatibles` lists the classes a config
swaps into; `register_to_config` adds keys. The quirks users meet in diffusers are kept: saving
records `_class_name` / `_diffusers_version` in `.config`, and a config key read as an attribute
(`scheduler.beta_start`) works with a FutureWarning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from weights_conversion.configs import DIFFUSERS_VERSION

from .. import files
from ..config import FrozenDict
from ..loading import load_config
from .config import NoiseScheduleConfig

CONFIG_NAME = "scheduler_config.json"

# diffusers' KarrasDiffusionSchedulers: the classes Stable Diffusion pipelines take, each built from the others'
# configs (the `_compatibles` of all of them; LCM, TCD and the EDM schedulers list none)
KARRAS_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
)
# the keyword arguments of diffusers' from_pretrained that say where / how to fetch, not what to build
LOADING_KEYWORDS = ("torch_dtype", "dtype", "variant", "revision", "cache_dir", "token", "force_download", "proxies")


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class ConfigMixin:
    """Config, (de)serialisation and class swapping shared by every scheduler.

    `self.config` is a FrozenDict of the keys (attribute and key access), plus, as in diffusers,
    any `_`-prefixed bookkeeping, `_use_default_values` (the keys left at their default, so that
    `Other.from_config(this.config)` gives those keys Other's defaults), and the keys of other
    classes that `from_config` was handed (kept to be handed on to the next class).
    """

    config_name: ClassVar[str] = CONFIG_NAME
    config_class: ClassVar[type[NoiseScheduleConfig]] = NoiseScheduleConfig
    _compatibles: ClassVar[tuple[str, ...]] = KARRAS_SCHEDULERS
    _deprecated_kwargs: ClassVar[list[str]] = []  # diffusers' attribute: keywords still taken but deprecated (none)
    has_compatibles: ClassVar[bool] = True
    _classes: ClassVar[dict[str, type]] = {}  # every scheduler class by name: what `compatibles` resolves names to
    config: FrozenDict

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ConfigMixin._classes[cls.__name__] = cls

    def __init__(self, **config: Any) -> None:
        given = {k: v for k, v in config.items() if not k.startswith("_")}
        keys = self.config_class.validated(type(self).__name__, **given)
        private = {k: v for k, v in config.items() if k.startswith("_")}
        full = {**private, **dict(keys.items())}
        if defaulted := [k for k in keys.keys() if k not in given]:
            full["_use_default_values"] = defaulted
        self.config = FrozenDict(full)

    def __getattr__(self, name: str) -> Any:
        """Only reached when normal lookup fails: a config key still reads as an attribute, with
        diffusers' deprecation warning; anything else is the usual AttributeError."""
        config = self.__dict__.get("config")
        if config is not None and name in config and not name.startswith("__"):
            warnings.warn(
                f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute is "
                f"deprecated. Please access '{name}' over '{type(self).__name__}'s config object instead, e.g. "
                f"'scheduler.config.{name}'.",
                FutureWarning,
                stacklevel=2,
            )
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The keys this class takes: the fields of its config class."""
        return tuple(f.name for f in dataclasses.fields(cls.config_class))

    @property
    def compatibles(self) -> list[type]:
        """The classes this scheduler's config can build (`Other.from_config(self.config)`): diffusers' list for
        this class, itself included, restricted to the classes minidiff has."""
        names = dict.fromkeys((type(self).__name__, *self._compatibles))
        return [ConfigMixin._classes[n] for n in names if n in ConfigMixin._classes]

    def register_to_config(self, **keys: Any) -> None:
        """Add (or replace) keys of `.config`, as diffusers' method does; the scheduler's behaviour is what its
        keys were when it was built."""
        self.config = FrozenDict({**self.config, **keys})

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **overrides: Any):
        """Build from another scheduler's config (any class): known keys are used, the rest are kept."""
        if config is None:
            raise ValueError(f"{cls.__name__}.from_config needs a config dict (e.g. other_scheduler.config)")
        if not isinstance(config, dict):
            raise TypeError(f"{cls.__name__}.from_config takes a dict; use from_pretrained for a path or Hub id")
        defaulted = set(config.get("_use_default_values", []))
        config = {k: v for k, v in config.items() if k not in defaulted and k != "_use_default_values"}
        known = cls.config_keys()
        init = {k: config[k] for k in known if k in config}
        init.update({k: overrides.pop(k) for k in known if k in overrides})
        # keys this class does not take stay in the config, to be handed on to the next class
        hidden = {k: v for k, v in config.items() if k not in init}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler = cls(**init)
        scheduler.config = FrozenDict({**scheduler.config, **hidden})
        return (scheduler, {**overrides, **hidden}) if return_unused_kwargs else scheduler

    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        local_files_only: bool = False,
        **unused: Any,
    ) -> dict[str, Any]:
        """scheduler_config.json of a local folder or a Hub id (and subfolder), as a dict."""
        return load_config(pretrained_model_name_or_path, subfolder, cls.config_name, local_files_only)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        local_files_only: bool = False,
        return_unused_kwargs: bool = False,
        **overrides: Any,
    ):
        """Read scheduler_config.json from a local folder or a Hub id (and subfolder)."""
        for loading_only in LOADING_KEYWORDS:
            overrides.pop(loading_only, None)
        config = cls.load_config(pretrained_model_name_or_path, subfolder, local_files_only)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool | None = None, **unused: Any) -> None:
        """Write scheduler_config.json as diffusers writes it (diffusers loads it back), atomically;
        `overwrite` as minidiff.files.output_folder. As in diffusers, `.config` then holds the
        `_class_name` and `_diffusers_version` written."""
        if unused.get("push_to_hub"):
            raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported: upload the folder yourself")
        stamp = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        self.config = FrozenDict({**self.config, **stamp})
        config = {k: _json_value(v) for k, v in self.config.items() if k != "_use_default_values"}
        with files.output_folder(save_directory, overwrite, self.config_name) as out:
            files.write_text(out / self.config_name, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def save_config(self, save_directory: str | os.PathLike, overwrite: bool | None = None, **unused: Any) -> None:
        """diffusers' name for save_pretrained (the same file)."""
        self.save_pretrained(save_directory, overwrite, **unused)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        return f"{type(self).__name__} {json.dumps(_json_value(shown), indent=2, sort_keys=True)}"
