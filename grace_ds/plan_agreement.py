"""Every rank must serve the same plan: a digest of it, all-gathered before serving or switching."""
from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan


def agree_on_plan(plan: PlacementPlan, source: str, group=None) -> None:
    """Every rank must serve the same plan: an all-gather of its digest (phase 'plan loading'), so a
    rank that failed to load, stalls, or read another file stops the job with one message."""
    if not faults.distributed():
        return
    digest = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).digest()[:8]
    device = faults.collective_device(group)
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    everyone = faults.all_gather_tensor(mine, f"plan loading ({source})", group).flatten().tolist()
    differ = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if differ:
        raise GraceInputError(f"{source}: ranks {differ} hold a different plan than rank 0; give every rank the "
                              "same plan file")


def broadcast_plan(plan: PlacementPlan | None, phase: str, group=None, source_rank: int = 0) -> PlacementPlan | None:
    """The source rank's plan (or None) on every rank: its JSON text, length first, as byte tensors. Plans
    made by one rank need no bit-identical planning on the others (threaded BLAS may break ties apart)."""
    if not faults.distributed():
        return plan
    device = faults.collective_device(group)
    mine = dist.get_rank() == source_rank
    text = json.dumps(plan.to_dict()).encode() if mine and plan is not None else b""
    length = torch.tensor([len(text)], dtype=torch.int64, device=device)
    faults.guarded(phase, group, dist.broadcast, length, source_rank, group=group)
    if int(length) == 0:
        return None
    payload = (torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device) if mine
               else torch.empty(int(length), dtype=torch.uint8, device=device))
    faults.guarded(phase, group, dist.broadcast, payload, source_rank, group=group)
    return plan if mine else PlacementPlan.from_dict(json.loads(bytes(payload.cpu().tolist())), phase)
