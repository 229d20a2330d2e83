"""megatron-core 0.19.x on a machine without CUDA (test-only; gloo process groups).

Where megatron-core calls CUDA directly on paths GRACE's tests use:
- moe/router.py: moves the router weight to `torch.cuda.current_device()` on first use;
- moe/token_dispatcher.py: the alltoall dispatcher copies split sizes to the host on a CUDA side stream,
  as numpy arrays that the all-to-all then takes as split lists;
- tensor_parallel/mappings.py and utils.py (its global buffer): allocate on the current CUDA device;
- dist_checkpointing/strategies/{filesystem_async,torch,state_dict_saver}.py: synchronise the device,
  broadcast a status tensor from the current CUDA device.
This patch gives just those modules a `torch` whose `cuda` namespace is a CPU stand-in (current device
'cpu', streams and synchronisation that do nothing: on the CPU every tensor is already on the host and
every op has finished), and the dispatcher a host-copy helper that hands out split sizes as numpy
arrays for host tensors too. Nothing else sees it; `undo()` restores all of it. Apply it explicitly:

    from patches import megatron_core_cpu
    handle = megatron_core_cpu.apply()   # refuses other megatron-core versions, or a machine with CUDA
    ...
    handle.undo()
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch

TARGET_VERSION = "0.19."
PATCHED_MODULES = ("megatron.core.transformer.moe.router", "megatron.core.transformer.moe.token_dispatcher",
                   "megatron.core.tensor_parallel.mappings", "megatron.core.utils",
                   "megatron.core.dist_checkpointing.strategies.filesystem_async",
                   "megatron.core.dist_checkpointing.strategies.torch",
                   "megatron.core.dist_checkpointing.strategies.state_dict_saver")


class _HostEvent:
    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _HostStream:
    """What the dispatcher asks of a CUDA stream, on the host: all work is already done."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return _HostEvent()

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def _host_cuda() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        Stream=lambda *args, **kwargs: _HostStream(),
        Event=lambda *args, **kwargs: _HostEvent(),
        current_stream=lambda *args, **kwargs: _HOST_STREAM,
        stream=lambda stream=None: contextlib.nullcontext(),
        current_device=lambda: "cpu",
        is_available=lambda: False,
        is_current_stream_capturing=lambda: False,
        get_device_capability=lambda *args: (0, 0),
        synchronize=lambda *args: None,
    )


class _TorchWithHostCuda(types.ModuleType):
    """torch, except `torch.cuda`."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _host_cuda()

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """The dispatcher's copy-to-host helper for tensors already on the host."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


class Handle:
    def __init__(self, originals: list[tuple[types.ModuleType, str, object]]) -> None:
        self._originals = originals

    def undo(self) -> None:
        for module, name, original in self._originals:
            setattr(module, name, original)
        self._originals = []

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def apply() -> Handle:
    import megatron.core

    version = getattr(megatron.core, "__version__", "")
    if not version.startswith(TARGET_VERSION):
        raise RuntimeError(f"patches.megatron_core_cpu targets megatron-core {TARGET_VERSION}x, found {version!r}")
    if torch.cuda.is_available():
        raise RuntimeError("patches.megatron_core_cpu is for machines without CUDA; on a GPU use megatron-core as is")
    replacements = [(name, "torch", _TorchWithHostCuda()) for name in PATCHED_MODULES]
    replacements.append(("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu", _to_host))
    originals = []
    for module_name, attribute, replacement in replacements:
        module = importlib.import_module(module_name)
        originals.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, replacement)
    return Handle(originals)
