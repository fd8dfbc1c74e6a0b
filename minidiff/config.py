"""Config containers that read like diffusers' `.config`: attribute AND key access, immutable.

Models use frozen dataclasses (typed fields, SD defaults) that inherit `ConfigBase`;
schedulers keep every key they are given (diffusers keeps unknown keys so that a config can be
handed on to another scheduler class), so they use `FrozenDict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any


class ConfigBase:
    """Mixin for frozen dataclass configs: `cfg.key`, `cfg["key"]`, `cfg.get`, `dict(cfg.items())`."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.items()}


class FrozenDict(dict):
    """A dict that also allows `d.key` and refuses to be changed after construction."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def _immutable(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a config is immutable; build a new object with the changed keys instead")

    __setitem__ = __delitem__ = __setattr__ = _immutable  # type: ignore[assignment]
    pop = popitem = clear = update = setdefault = _immutable  # type: ignore[assignment]

    def __reduce__(self):  # picklable / deep-copyable despite the blocked mutators
        return (FrozenDict, (dict(self),))


def check_supported(model: str, choices: Iterable[tuple[str, Iterable[Any], Iterable[Any]]]) -> None:
    """Raise a ValueError naming the first config value minidiff does not implement.

    `choices` holds (key, the values it takes, the supported values); a per-level key takes several.
    """
    for key, values, allowed in choices:
        allowed = tuple(allowed)
        for value in values:
            if value not in allowed:
                raise ValueError(f"{model}: {key}={value!r} is not supported by minidiff (supported: {allowed})")


def check_levels(
    model: str, block_out_channels: tuple[int, ...], down_block_types: tuple[str, ...], up_block_types: tuple[str, ...]
) -> None:
    """A UNet-shaped config has one down block type, one up block type and one width per level."""
    n = len(block_out_channels)
    if len(down_block_types) != n or len(up_block_types) != n:
        raise ValueError(
            f"{model}: down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) "
            f"and block_out_channels ({n}) must have the same length"
        )
