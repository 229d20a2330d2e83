"""Distributed faults: no GRACE job hangs on a dead or stalled rank.

Every collective GRACE issues runs under a phase name (profiling, plan loading, dispatch, combine) on a
process group with a finite timeout. When one fails (a peer died) or times out (a peer stalled), each
surviving rank takes a roll call through the job's key-value store and raises one
`GraceDistributedError` naming the phase and the ranks that did not answer. The fault timeout
(`grace_moe.fault_timeout_s`) is split: collectives give up after 40% of it, the roll call waits the
other 60% (survivors notice a fault at different moments, at most one collective timeout apart, so
the roll call outlasts that spread), so survivors stop about one fault timeout after the fault (a ring
all-reduce waits in several steps and can take up to a third longer). Nothing is added to the hot path.

On NCCL a timed-out collective is also caught by NCCL's own watchdog, which may end the process with its
message (naming the collective) before the roll call completes.
"""
from __future__ import annotations

import datetime
import itertools
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from grace_ds.errors import GraceInputError

DEFAULT_TIMEOUT_S = 300.0
COLLECTIVE_SHARE = 0.4  # of the fault timeout; the roll call gets the rest


class GraceDistributedError(RuntimeError):
    """A GRACE collective could not complete; the message names the phase and the missing ranks."""


# Groups made by fault_group: their timeout and a generation number that every rank assigns alike
# (groups are created in the same order everywhere), so roll calls of different groups never mix.
_GROUPS: dict[Any, tuple[float, int]] = {}
_created = itertools.count(1)
_incidents: dict[int, int] = {}


def fault_group(timeout_s: float = DEFAULT_TIMEOUT_S, ranks: list[int] | None = None, members_only: bool = False):
    """A process group over `ranks` (default: all) on which a fault stops every survivor within
    timeout_s seconds. Collective: every rank of the job must call it, in the same order (members_only:
    only the members of `ranks`)."""
    if not timeout_s > 0:
        raise ValueError(f"fault timeout must be > 0 seconds, got {timeout_s!r}")
    group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s * COLLECTIVE_SHARE),
                           use_local_synchronization=members_only)
    # Counted on every rank that calls, members or not: generations agree as long as members_only groups
    # come one per rank at the same point (grace_ds.exchange.node_groups: each rank's own node).
    generation = next(_created)
    if group is not dist.GroupMember.NON_GROUP_MEMBER:
        _GROUPS[group] = (float(timeout_s), generation)
    return group


def timeout_of(group) -> float:
    """The fault timeout `group` was made with (fault_group), else the default."""
    return _GROUPS.get(group, (DEFAULT_TIMEOUT_S, 0))[0]


def guarded(phase: str, process_group, call: Callable, /, *args, **kwargs):
    """call(*args, **kwargs), a collective of `process_group`; its failure becomes a GraceDistributedError.
    While a CUDA graph is being captured nothing runs yet: a failure there is the capture's, not a peer's."""
    if not dist.is_initialized():  # else torch's own error names no cause a user can act on
        raise GraceInputError(f"GRACE {phase} needs a torch.distributed process group and none is initialized: "
                              f"start the job with scripts/launch.sh (or the deepspeed launcher), or call "
                              f"torch.distributed.init_process_group first")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return call(*args, **kwargs)
    try:
        return call(*args, **kwargs)
    except (RuntimeError, ConnectionError, TimeoutError) as error:
        if isinstance(error, GraceDistributedError):
            raise
        raise roll_call(phase, process_group, error) from None


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def _group_ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def roll_call(phase: str, group, cause: BaseException) -> GraceDistributedError:
    """Each survivor posts itself in the job's store and waits the roll call's share of the fault
    timeout for the others; the ranks that never post are named."""
    rank = dist.get_rank()
    timeout_s, generation = _GROUPS.get(group, (None, 0))
    ranks = _group_ranks(group)
    incident = _incidents.get(generation, 0)
    _incidents[generation] = incident + 1
    text = str(cause).strip()
    reason = text.splitlines()[0].split(". This is typically")[0][:300] if text else type(cause).__name__
    waited = f" (fault timeout {timeout_s:g} s)" if timeout_s else ""
    store = _store()
    if store is None:
        return GraceDistributedError(f"rank {rank}: GRACE {phase} stopped{waited}; no store to ask which rank "
                                     f"failed. Cause here: {reason}")
    prefix = f"grace_fault/g{generation}/i{incident}/"
    try:
        store.set(prefix + str(rank), phase)
        deadline = time.monotonic() + (timeout_s or DEFAULT_TIMEOUT_S) * (1 - COLLECTIVE_SHARE)
        present = {rank}
        while time.monotonic() < deadline and len(present) < len(ranks):
            present |= {r for r in ranks if r not in present and store.check([prefix + str(r)])}
            time.sleep(0.05)
    except (RuntimeError, ConnectionError, TimeoutError) as error:
        return GraceDistributedError(f"rank {rank}: GRACE {phase} stopped{waited}; the job's store (on the "
                                     f"first rank's host) is unreachable too ({error}), so that rank is likely "
                                     f"gone. Cause here: {reason}")
    missing = [r for r in ranks if r not in present]
    if missing:
        who = ", ".join(map(str, missing))
        return GraceDistributedError(f"rank {rank}: GRACE {phase} stopped{waited}: rank{'s' if len(missing) > 1 else ''} "
                                     f"{who} did not answer (dead or stalled). Cause here: {reason}")
    return GraceDistributedError(f"rank {rank}: GRACE {phase} failed{waited}: every other rank had already "
                                 f"stopped on a fault (their messages name it). Cause here: {reason}")


def distributed() -> bool:
    """Whether this process is in a job's process group (torch.distributed initialised)."""
    return dist.is_available() and dist.is_initialized()


def job_rank() -> int:
    """This process's rank in the job (0 without a process group)."""
    return dist.get_rank() if distributed() else 0


def collective_device(group=None) -> torch.device:
    """Where `group`'s collectives take their tensors: NCCL only device tensors, gloo (and no process
    group at all) only host ones."""
    if distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, phase: str, group=None, op=dist.ReduceOp.SUM) -> None:
    guarded(phase, group, dist.all_reduce, tensor, op=op, group=group)


def all_reduced_on_host(tensor: torch.Tensor, phase: str, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A host tensor all-reduced over `group` on the device its backend takes (NCCL: the GPU), back on
    the host; as it is without torch.distributed."""
    if not distributed():
        return tensor
    on_device = tensor.to(collective_device(group))
    all_reduce(on_device, phase, group, op)
    return on_device.cpu()


def all_gather_tensor(tensor: torch.Tensor, phase: str, group=None) -> torch.Tensor:
    """[world, *tensor.shape]: every rank's tensor."""
    out = [torch.empty_like(tensor) for _ in _group_ranks(group)]
    guarded(phase, group, dist.all_gather, out, tensor, group=group)
    return torch.stack(out)
