"""The rename engine: templated prefix rules applied to a whole state dict, strictly.

A rule maps a key prefix template to another, e.g.

    Rule("down_blocks.{i}.downsamplers.0.conv.", "down_blocks.{i}.downsample.")

`{name}` placeholders match a decimal index and are carried over; the rest of the key (the leaf,
"weight"/"bias") is kept. The first matching rule wins, so specific rules go before general ones.
`legacy` rules are accepted when loading and never written when saving. A rule may carry a tensor
`transform` (loading) and its `inverse` (saving), e.g. a 1x1 conv kernel <-> a Linear weight.

Strictness is the point: every source key is used by exactly one rule or explicitly ignored, no
two sources land on the same target, and the result has exactly the expected keys and shapes.
Any violation raises `ConversionError` naming the offending keys, so a wrong mapping can never
leave a layer silently at its random initialisation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]


class ConversionError(ValueError):
    """A state dict that does not map one-to-one onto the model."""


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    # even parts are literal text, odd parts placeholder names
    body = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
    return re.compile(rf"^{body}(?P<_rest>.*)$", re.DOTALL)


@dataclass(frozen=True)
class Rule:
    src: str
    dst: str
    legacy: bool = False
    transform: Transform | None = None
    inverse: Transform | None = None
    _src_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _dst_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_src_re", _template_regex(self.src))
        object.__setattr__(self, "_dst_re", _template_regex(self.dst))


def same(*prefixes: str) -> list[Rule]:
    """Identity rules: prefixes whose names minidiff keeps as they are."""
    return [Rule(p, p) for p in prefixes]


def _rename(
    state_dict: Mapping[str, torch.Tensor],
    pairs: list[tuple[re.Pattern[str], str, Transform | None]],
    ignore: Iterable[re.Pattern[str]],
    what: str,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmatched: list[str] = []
    ignore = list(ignore)
    for key, tensor in state_dict.items():
        if any(p.match(key) for p in ignore):
            continue
        for pattern, target, fn in pairs:
            m = pattern.match(key)
            if m is None:
                continue
            groups = m.groupdict()
            new_key = target.format(**groups) + groups["_rest"]
            if new_key in out:
                raise ConversionError(f"{what}: {origin[new_key]!r} and {key!r} both map to {new_key!r}")
            out[new_key] = fn(tensor) if fn is not None else tensor
            origin[new_key] = key
            break
        else:
            unmatched.append(key)
    if unmatched:
        raise ConversionError(f"{what}: no rule for {len(unmatched)} key(s): {_show(unmatched)}")
    return out


def _show(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_exact(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str) -> None:
    """The converted dict must have exactly the model's keys, each with the model's shape."""
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (model wants {tuple(expected[k])})"
        for k in state_dict
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_show(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} key(s): {_show(extra)}")
    if wrong:
        problems.append(f"wrong shape for {len(wrong)}: {_show(wrong)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def convert(
    state_dict: Mapping[str, torch.Tensor],
    rules: Iterable[Rule],
    expected: Mapping[str, torch.Size] | None = None,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Foreign names -> minidiff names. `ignore` lists key templates dropped on purpose."""
    pairs = [(r._src_re, r.dst, r.transform) for r in rules]
    out = _rename(state_dict, pairs, [_template_regex(t) for t in ignore], what)
    if expected is not None:
        check_exact(out, expected, what)
    return out


def export(
    state_dict: Mapping[str, torch.Tensor],
    rules: Iterable[Rule],
    what: str = "model",
) -> dict[str, torch.Tensor]:
    """minidiff names -> the foreign layout (the inverse of `convert`, legacy rules excluded)."""
    pairs = [(r._dst_re, r.src, r.inverse) for r in rules if not r.legacy]
    return _rename(state_dict, pairs, [], what)
