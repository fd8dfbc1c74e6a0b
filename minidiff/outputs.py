"""BaseOutput: the output dataclasses of models, schedulers and pipelines, read as diffusers' are."""

from __future__ import annotations

import dataclasses
from typing import Any


class BaseOutput:
    """Mixin for output dataclasses: `out.sample` and `out[0]` both work, as in diffusers."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None)  # type: ignore[arg-type]

    def __getitem__(self, index: int | str) -> Any:
        return getattr(self, index) if isinstance(index, str) else self.to_tuple()[index]
