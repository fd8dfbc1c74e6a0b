"""BaseOutput: the output dataclasses of models, schedulers and pipelines, read as diffusers' are."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch.utils._pytree as pytree


class BaseOutput(OrderedDict):
    """Base of the output dataclasses: `out.sample`, `out[0]`, `out["sample"]`, `"sample" in out`,
    `out.keys()` / `values()` / `items()` and `out.to_tuple()` all work, as in diffusers.

    As in diffusers, the mapping holds only the fields that are not None (`out[0]` is the first of
    those), and it is kept in step with the attributes; keys cannot be removed.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a pytree node, so that torch.compile / torch.export see through outputs (diffusers registers them too)
        pytree.register_pytree_node(
            cls,
            lambda out: (list(out.values()), list(out.keys())),
            lambda values, keys: cls(**dict(zip(keys, values))),
        )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if (value := getattr(self, f.name)) is not None:
                super().__setitem__(f.name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key: int | slice | str) -> Any:
        return super().__getitem__(key) if isinstance(key, str) else self.to_tuple()[key]

    def _immutable(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__}: keys cannot be removed or bulk-changed; set an attribute instead")

    __delitem__ = pop = popitem = setdefault = update = _immutable  # type: ignore[assignment]

    def to_tuple(self) -> tuple[Any, ...]:
        """The values that are not None, in field order."""
        return tuple(self[k] for k in self.keys())

    def __reduce__(self):  # pickle / deepcopy through the dataclass constructor
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]
