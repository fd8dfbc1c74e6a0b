"""CPU offload: keep the weights in CPU memory and bring them to the accelerator only to compute.

diffusers does this with accelerate's hooks; minidiff with its own two, which behave the same:
- `ModelOffload` (pipe.enable_model_cpu_offload): a whole model moves to the accelerator when one
  of its entry points runs (`forward`, and the VAE's `encode` / `decode`), and the model that ran
  before it goes back to the CPU, so one model at a time holds accelerator memory.
- `SequentialOffload` (pipe.enable_sequential_cpu_offload): every module that owns parameters
  copies them to the accelerator just before its own forward and drops the copy right after, so
  only one layer's weights are on the accelerator at any time (slow, the least memory).
Both move the tensor arguments to the accelerator too, as accelerate does, so a module always
computes where its weights are. `remove()` undoes either and leaves the weights on the CPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

# the methods through which a pipeline runs a model (diffusers hooks `encode` / `decode` of its VAE too)
ENTRY_POINTS = ("forward", "encode", "decode")


def accelerator() -> str:
    """diffusers' get_device(): the type of the available accelerator, or "cpu" when there is none."""
    found = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return found.type if found is not None else "cpu"


def offload_device(what: str, gpu_id: int | None, device: torch.device | str | None) -> torch.device:
    """The execution device as diffusers picks it: the accelerator found (none: RuntimeError), or the
    device given; `gpu_id` names its index unless the device string already does."""
    if device is None:
        device = accelerator()
        if device == "cpu":
            raise RuntimeError(f"`{what}` requires accelerator, but not found")
    device = torch.device(device)
    if gpu_id is not None and device.index is not None:
        raise ValueError(f"`{what}`: pass the device index as `gpu_id`={gpu_id} or in `device`={device}, not both")
    if device.type == "cpu":
        return device
    return torch.device(device.type, gpu_id or device.index or 0)


def _to(value: Any, device: torch.device) -> Any:
    """Tensors (also inside lists, tuples and dicts) moved to `device`; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class ModelOffload:
    """One model at a time on `device`: running a hooked model offloads the one that ran before."""

    def __init__(self, models: list[nn.Module], device: torch.device) -> None:
        self.models, self.device = models, device
        self.active: nn.Module | None = None  # the model whose weights are on `device` now
        for model in models:
            model.to("cpu")
            for name in ENTRY_POINTS:
                if callable(getattr(type(model), name, None)):
                    # an instance attribute shadows the class's method (nn.Module.__call__ reads self.forward)
                    object.__setattr__(model, name, self._wrap(model, getattr(model, name)))

    def _wrap(self, model: nn.Module, method: Any) -> Any:
        @functools.wraps(method)
        def run(*args: Any, **kwargs: Any) -> Any:
            self.load(model)
            return method(*_to(args, self.device), **_to(kwargs, self.device))

        return run

    def load(self, model: nn.Module) -> None:
        if self.active is not model:
            self.offload()
            model.to(self.device)
            self.active = model

    def offload(self) -> None:
        """The active model back to the CPU (diffusers' maybe_free_model_hooks does this after a call)."""
        if self.active is not None:
            self.active.to("cpu")
            self.active = None

    def remove(self) -> None:
        self.offload()
        for model in self.models:
            for name in ENTRY_POINTS:
                model.__dict__.pop(name, None)


class SequentialOffload:
    """Each module's own parameters and buffers copied to `device` for its forward only."""

    def __init__(self, models: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.handles: list[Any] = []
        self.cpu: dict[nn.Module, dict[str, torch.Tensor]] = {}  # module -> its own CPU parameters / buffers
        for model in models:
            model.to("cpu")
            for module in model.modules():
                own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
                if not own:
                    continue
                self.cpu[module] = own
                self.handles.append(module.register_forward_pre_hook(self._load, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._drop, always_call=True))

    def _set(self, module: nn.Module, device: torch.device | None) -> None:
        """Put copies on `device` in the module's slots for one forward, or (None) the CPU originals back."""
        for name, cpu in self.cpu[module].items():
            slots = module._parameters if name in module._parameters else module._buffers
            if device is None:
                slots[name] = cpu
            elif isinstance(cpu, nn.Parameter):
                slots[name] = nn.Parameter(cpu.detach().to(device), requires_grad=cpu.requires_grad)
            else:
                slots[name] = cpu.to(device)

    def _load(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._set(module, self.device)
        return _to(args, self.device), _to(kwargs, self.device)

    def _drop(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._set(module, None)

    def offload(self) -> None:
        """Nothing stays on the accelerator between forwards."""

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.cpu:
            self._set(module, None)
        self.handles, self.cpu = [], {}
