"""Per-layer comparison of a minidiff model with the diffusers / transformers model it reimplements.

When two ports of a network disagree, the final output only says *that* they do. This tool says
*where*: it runs the same input through both with forward hooks on every module that owns weights,
pairs the modules through the checkpoint converter's rename rules (the same tables that load the
weights, so the pairing cannot drift from the loading), and reports the first module, in execution
order, whose output differs by more than a tolerance.

    from minidiff.compare import compare_layers
    report = compare_layers(ours, reference, lambda m: m(latents, t, encoder_hidden_states=ctx))
    print(report)                  # the first divergent module, with its error
    report.first_divergence        # a LayerDiff, or None when everything is within tolerance

Pairing: every module's set of state-dict keys is exported through the rules (minidiff names ->
foreign names) and matched with the reference module that owns exactly those keys. Where several
nested modules own the same keys (a Linear, and a wrapper holding only that Linear), they are
paired from the innermost outwards; ModuleLists are never called, so they are left out. Modules
without weights (activations, dropout) are not hooked. A copy of every paired reference output is
kept for the run, so compare at small input sizes.

Errors are PARITY.md's measure, max|a - b| / max|b|, on the first tensor a module returns.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LayerDiff:
    """One call of one paired module."""

    name: str  # the minidiff module
    reference_name: str  # its twin in the reference model
    call: int  # 0 for the module's first call in the run, 1 for its second, ...
    rel_err: float  # max|ours - reference| / max|reference|; inf when the outputs cannot be compared
    max_abs_err: float
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    note: str = ""


@dataclass
class LayerReport:
    """The comparison of every paired module's outputs, in the minidiff model's execution order."""

    tolerance: float
    layers: list[LayerDiff]
    output_rel_err: float | None  # of the tensors `run` returned (the first tensor of each)
    unpaired: list[str] = field(default_factory=list)  # minidiff modules with weights but no twin

    @property
    def divergences(self) -> list[LayerDiff]:
        return [d for d in self.layers if not d.rel_err <= self.tolerance]

    @property
    def first_divergence(self) -> LayerDiff | None:
        bad = self.divergences
        return bad[0] if bad else None

    def __str__(self) -> str:
        lines = []
        first = self.first_divergence
        if first is None:
            lines.append(f"all {len(self.layers)} module outputs within rel err {self.tolerance:.0e}")
        else:
            lines.append(
                f"first divergence: {first.name or '<model>'} (reference: {first.reference_name or '<model>'}), "
                f"call {first.call}: rel err {first.rel_err:.3e} > {self.tolerance:.0e}, max abs err "
                f"{first.max_abs_err:.3e}, shape {first.shape}" + (f" ({first.note})" if first.note else "")
            )
            later = self.divergences[1:6]
            if later:
                lines.append("then: " + ", ".join(f"{d.name} {d.rel_err:.1e}" for d in later))
            lines.append(f"{len(self.divergences)} of {len(self.layers)} module outputs diverge")
        if self.output_rel_err is not None:
            lines.append(f"output rel err {self.output_rel_err:.3e}")
        if self.unpaired:
            shown = ", ".join(self.unpaired[:8]) + (" ..." if len(self.unpaired) > 8 else "")
            lines.append(f"{len(self.unpaired)} minidiff module(s) with weights and no reference twin: {shown}")
        return "\n".join(lines)


def _module_keys(
    model: nn.Module, rename: Callable[[str], str | None] = lambda k: k
) -> dict[str, frozenset[str] | None]:
    """module name -> the (renamed) state-dict keys under it; None where a key has no rename.

    ModuleLists and ModuleDicts are left out: they are never called, so they have no output.
    """
    keys: dict[str, set[str] | None] = defaultdict(set)
    for key in model.state_dict():
        new = rename(key)
        parts = key.split(".")[:-1]
        for depth in range(len(parts) + 1):
            name = ".".join(parts[:depth])
            if new is None or keys[name] is None:
                keys[name] = None
            else:
                keys[name].add(new)
    containers = {name for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))}
    return {name: None if ks is None else frozenset(ks) for name, ks in keys.items() if name not in containers}


def _exporter(rules: Iterable[Any]) -> Callable[[str], str | None]:
    """A minidiff key -> its foreign name, by the first non-legacy rule whose target matches (as export does)."""
    rules = [r for r in rules if not r.legacy]

    def rename(key: str) -> str | None:
        for rule in rules:
            m = rule._dst_re.match(key)  # the engine's own compiled template
            if m is not None:
                groups = m.groupdict()
                return rule.src.format(**groups) + groups["_rest"]
        return None

    return rename


def _aligned(rename: Callable[[str], str | None], ours: nn.Module, reference: nn.Module) -> Callable[[str], str | None]:
    """Fit the exported names to the reference's module tree, which may nest the file's keys one
    level less or more (transformers 5's CLIPTextModel has no `text_model.` level, its files do)."""
    exported = {n for k in ours.state_dict() if (n := rename(k)) is not None}
    wanted = set(reference.state_dict())
    heads = {k.split(".", 1)[0] + "." for k in exported | wanted if "." in k}
    shifts: list[Callable[[str], str]] = [lambda k: k]
    shifts += [lambda k, p=p: k[len(p) :] if k.startswith(p) else k for p in heads]
    shifts += [lambda k, p=p: p + k for p in heads]
    best = max(shifts, key=lambda shift: len({shift(k) for k in exported} & wanted))
    return lambda key: None if (n := rename(key)) is None else best(n)


def module_pairs(ours: nn.Module, reference: nn.Module, rules: Iterable[Any] | None = None) -> dict[str, str]:
    """Map each minidiff module name to the reference module that owns the same weights.

    `rules` defaults to the minidiff model's converter rules (its `weights_format`).
    """
    if rules is None:
        rules = type(ours).weights_format.rules(ours.config)
    ours_keys = _module_keys(ours, _aligned(_exporter(rules), ours, reference))
    by_keys: dict[frozenset[str], list[str]] = defaultdict(list)
    for name, ks in _module_keys(reference).items():
        if ks:
            by_keys[ks].append(name)
    ours_by_keys: dict[frozenset[str], list[str]] = defaultdict(list)
    for name, ks in ours_keys.items():
        if ks:
            ours_by_keys[ks].append(name)

    def innermost_first(names: list[str]) -> list[str]:
        return sorted(names, key=lambda n: -len(n.split(".")) if n else 0)

    pairs = {}
    for ks, names in ours_by_keys.items():
        for ours_name, ref_name in zip(innermost_first(names), innermost_first(by_keys.get(ks, []))):
            pairs[ours_name] = ref_name
    return pairs


def _first_tensor(x: Any) -> torch.Tensor | None:
    """The tensor a module or model call returned: itself, or the first one inside an output object."""
    if torch.is_tensor(x):
        return x
    if isinstance(x, dict):
        items: Iterable[Any] = x.values()
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        items = (getattr(x, f.name) for f in dataclasses.fields(x))
    elif isinstance(x, (tuple, list)):
        items = x
    else:
        return None
    for item in items:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    max_abs = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return max_abs / max(scale, 1e-12), max_abs


@torch.no_grad()
def compare_layers(
    ours: nn.Module,
    reference: nn.Module,
    run: Callable[[nn.Module], Any],
    tolerance: float = 1e-4,
    rules: Iterable[Any] | None = None,
) -> LayerReport:
    """Run `run(reference)` then `run(ours)` with hooks, and compare every paired module's output.

    `run` calls a model the way you want it compared and returns its result, e.g.
    `lambda m: m(x, t, encoder_hidden_states=ctx)` or `lambda m: m.decode(z).sample`; both models
    must have the same weights (one loaded from the other's checkpoint). `rules` is as in
    `module_pairs`. Works with any minidiff model whose converter
    rules name the reference's keys, on any device and dtype (errors are computed in float64).
    """
    pairs = module_pairs(ours, reference, rules)
    ours_modules = dict(ours.named_modules())
    ref_modules = dict(reference.named_modules())
    ref_outputs: dict[str, list[torch.Tensor | None]] = defaultdict(list)
    layers: list[LayerDiff] = []
    calls: dict[str, int] = defaultdict(int)

    def record(ref_name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            ref_outputs[ref_name].append(
                None if t is None else t.detach().clone()
            )  # later in-place ops must not change it

        return hook

    def check(name: str, ref_name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            call = calls[name]
            calls[name] += 1
            a, seen = _first_tensor(output), ref_outputs.get(ref_name, [])
            b = seen[call] if call < len(seen) else None
            shape = tuple(a.shape) if a is not None else ()
            if a is None or b is None:
                note = "the reference module was not called as often" if call >= len(seen) else "no tensor output"
                layers.append(
                    LayerDiff(
                        name,
                        ref_name,
                        call,
                        float("inf"),
                        float("inf"),
                        shape,
                        tuple(b.shape) if b is not None else (),
                        note,
                    )
                )
            elif a.numel() != b.numel():
                layers.append(
                    LayerDiff(name, ref_name, call, float("inf"), float("inf"), shape, tuple(b.shape), "shapes differ")
                )
            else:
                # the same numbers may be laid out differently, e.g. (B, C, H, W) against (B, C, H*W)
                err, max_abs = _diff(a.reshape(b.shape), b)
                note = "" if a.shape == b.shape else "compared after a reshape"
                layers.append(LayerDiff(name, ref_name, call, err, max_abs, shape, tuple(b.shape), note))

        return hook

    handles = [ref_modules[r].register_forward_hook(record(r)) for r in pairs.values()]
    try:
        ref_result = _first_tensor(run(reference))
    finally:
        for h in handles:
            h.remove()
    handles = [ours_modules[n].register_forward_hook(check(n, r)) for n, r in pairs.items()]
    try:
        ours_result = _first_tensor(run(ours))
    finally:
        for h in handles:
            h.remove()

    output_err = None
    if ours_result is not None and ref_result is not None and ours_result.shape == ref_result.shape:
        output_err = _diff(ours_result, ref_result)[0]
    with_weights = {n for n, ks in _module_keys(ours).items() if ks}
    unpaired = sorted(n for n in with_weights if n not in pairs and not _has_paired_child(n, pairs))
    return LayerReport(tolerance, layers, output_err, unpaired)


def _has_paired_child(name: str, pairs: dict[str, str]) -> bool:
    """Containers (ModuleLists, whole blocks) whose weights are covered by paired children need no twin."""
    prefix = name + "." if name else ""
    return any(p.startswith(prefix) and p != name for p in pairs)


@torch.no_grad()
def assert_same_outputs(
    ours: nn.Module, reference: nn.Module, run: Callable[[nn.Module], Any], tolerance: float = 1e-4, **pairing: Any
) -> float:
    """Compare `run(ours)` with `run(reference)`; if they differ beyond `tolerance`, rerun both with
    hooks and raise an AssertionError that names the first divergent module. Returns the rel err.
    `pairing` (rules) is passed on to `compare_layers`."""
    a, b = _first_tensor(run(ours)), _first_tensor(run(reference))
    if a is None or b is None:
        raise TypeError("`run` must return a tensor or an output object holding one")
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: {tuple(a.shape)} vs reference {tuple(b.shape)}")
    err = _diff(a, b)[0]
    if not err <= tolerance:
        report = compare_layers(ours, reference, run, tolerance, **pairing)
        raise AssertionError(f"output rel err {err:.3e} > {tolerance:.0e}\n{report}")
    return err
