"""Config translation: a foreign JSON config (diffusers / transformers) <-> a minidiff dataclass.

minidiff's dataclass fields use diffusers' key names (so `unet.config.in_channels` reads as in
diffusers) and hold only what the model is built from. Reading a foreign config therefore means:
fill the keys it leaves out with the foreign library's defaults, refuse the keys of features
minidiff does not implement (each accepted only at the values that switch it off), drop
`_`-prefixed bookkeeping and every other key the dataclass does not hold (diffusers tolerates
unknown keys too), turn JSON lists into tuples, and let the dataclass validate the values.
Writing back adds the `_class_name` header diffusers expects and the keys the dataclass left out,
at the foreign defaults, so that the file is the complete config diffusers itself writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

C = TypeVar("C")

# the diffusers version whose file layout minidiff writes (and tests against)
DIFFUSERS_VERSION = "0.42.1"


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def refuse_unsupported(
    model: str, raw: Mapping[str, Any], supported: Mapping[str, tuple[Any, ...]], per_level: Collection[str] = ()
) -> None:
    """Raise a ValueError naming the first key whose value minidiff does not implement.

    `supported` maps a key to the values it may take; a key in `per_level` may also hold one value per level.
    """
    for key, allowed in supported.items():
        if key not in raw:
            continue
        value = _tuples(raw[key])
        for v in value if key in per_level and isinstance(value, tuple) else (value,):
            if v not in allowed:
                raise ValueError(f"{model}: {key}={v!r} is not supported by minidiff (supported: {allowed})")


def config_from_dict(
    config_cls: type[C],
    raw: Mapping[str, Any],
    model: str,
    defaults: Mapping[str, Any] | None = None,
    unsupported: Mapping[str, tuple[Any, ...]] | None = None,
    per_level: Collection[str] = (),
) -> C:
    """Build `config_cls` from a JSON dict; keys it lacks take `defaults`, keys outside its fields are
    ignored unless `unsupported` refuses their value (see refuse_unsupported), invalid values raise ValueError."""
    raw = {**(defaults or {}), **raw}
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    kwargs = {key: _tuples(value) for key, value in raw.items() if key in names and not key.startswith("_")}
    try:
        refuse_unsupported(model, raw, unsupported or {}, per_level)
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {model} config: {e}") from e


def config_to_dict(
    config: Any,
    class_name: str,
    version_key: str = "_diffusers_version",
    left_out: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A dataclass config as the JSON dict diffusers writes (and reads back); `left_out` holds the keys
    the dataclass does not have, at the values to write."""
    out: dict[str, Any] = {"_class_name": class_name, version_key: DIFFUSERS_VERSION, **(left_out or {})}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
