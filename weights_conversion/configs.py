"""Config translation: a foreign JSON config (diffusers / transformers) <-> a minidiff dataclass.

minidiff's dataclass fields use diffusers' key names (so `unet.config.in_channels` reads as in
diffusers); translation therefore means: drop `_`-prefixed bookkeeping and keys minidiff does not
use (diffusers tolerates those too), apply legacy aliases, turn JSON lists into tuples, and let
the dataclass validate the values. Writing back adds the `_class_name` header diffusers expects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

C = TypeVar("C")

# the diffusers version whose file layout minidiff writes (and tests against)
DIFFUSERS_VERSION = "0.42.1"


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_dict(
    config_cls: type[C],
    raw: Mapping[str, Any],
    aliases: Mapping[str, str] | None = None,
    what: str = "config",
) -> C:
    """Build `config_cls` from a JSON dict; unknown keys are ignored, invalid values raise ValueError."""
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        key = (aliases or {}).get(key, key)
        if key in names and not key.startswith("_"):
            kwargs[key] = _tuples(value)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {what}: {e}") from e


def config_to_dict(config: Any, class_name: str, version_key: str = "_diffusers_version") -> dict[str, Any]:
    """A dataclass config as the JSON dict diffusers writes (and reads back)."""
    out: dict[str, Any] = {"_class_name": class_name, version_key: DIFFUSERS_VERSION}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
