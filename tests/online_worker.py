"""Runs inside every spawned rank: a model served through grace_ds.deepspeed.init_inference with online
re-planning on, while its routing drifts (token ids from one half of the vocabulary, then the other).
Every step's logits are compared with the unmodified model's; the plan changes on the way."""
import copy
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


from grace_ds.logical_nodes import join_logical_node
from grace_ds.models import find_moe_blocks
from grace_ds.planners import make_plan
from grace_ds.routing_stats import RoutingStats
from grace_ds.topology import Topology
from tests.tiny_models import tiny_model

DEVICE = torch.device(os.environ.get("GRACE_TEST_DEVICE", "cpu"))
SEQUENCES_PER_RANK, SEQUENCE_LENGTH, STEPS, DRIFT_AT = 2, 12, 14, 4
ONLINE = {"window_steps": 4, "interval_steps": 2, "drift_threshold": 0.0, "max_moves_per_step": 3,
          "transfer_chunk_mb": 0.001}  # ~1 KB chunks: every copy travels in several pieces


def batch(step: int, world: int) -> torch.Tensor:
    """Every rank's sequences of one step: low token ids before DRIFT_AT, high ones after."""
    generator = torch.Generator().manual_seed(step)
    low, high = (3, 64) if step < DRIFT_AT else (64, 128)
    return torch.randint(low, high, (world * SEQUENCES_PER_RANK, SEQUENCE_LENGTH), generator=generator)


def serve(rank: int, world: int, topology: Topology, mode: str, out_dir: str) -> dict:
    import grace_ds.deepspeed as grace_deepspeed

    reference = tiny_model("olmoe").to(DEVICE)
    blocks = find_moe_blocks(reference)
    recorder = RoutingStats(len(blocks), 8, 2).attach_to_routers(blocks)
    with torch.no_grad():
        reference(batch(0, world).to(DEVICE))
    recorder.detach()
    plan_path = Path(out_dir, f"plan_{mode}.json")
    if rank == 0:
        make_plan("grace", recorder.to_profile(reduce=False), topology, 1).save(plan_path)
    dist.barrier()
    config = {"dtype": torch.float32, "replace_with_kernel_inject": False,
              "grace_moe": {"plan": str(plan_path), "communication": mode, "online": ONLINE}}
    engine = grace_deepspeed.init_inference(copy.deepcopy(reference), config)
    runtime, replanner = engine.grace_runtime, engine.grace_replanner
    first_plan = runtime.plan
    mine = slice(rank * SEQUENCES_PER_RANK, (rank + 1) * SEQUENCES_PER_RANK)
    errors, pending_at = [], []
    for step in range(STEPS):
        ids = batch(step, world).to(DEVICE)
        pending_at.append(replanner.pending is not None)  # a transfer in flight during this forward
        with torch.no_grad():
            expected = reference(ids).logits[mine]
            out = engine(ids[mine]).logits
        errors.append(float((out - expected).abs().max() / expected.abs().max()))
    # Every slot this rank holds now carries exactly its logical expert's weights.
    wrong_slots = []
    for layer, (_, block) in enumerate(blocks):
        slots = runtime.slot_modules[layer]
        for slot, expert in enumerate(runtime.plan.slot_expert[layer, rank].tolist()):
            if expert < 0:
                continue
            gate_up, down = slots.slot_weights(slot)
            if not (torch.equal(gate_up, block.experts.gate_up_proj[expert])
                    and torch.equal(down, block.experts.down_proj[expert])):
                wrong_slots.append([layer, slot, expert])
    digest = hashlib.sha256(json.dumps(runtime.plan.to_dict(), sort_keys=True).encode()).hexdigest()
    return {"errors": errors, "pending_at": pending_at, "history": replanner.history, "wrong_slots": wrong_slots,
            "slots_changed": int((runtime.plan.slot_expert != first_plan.slot_expert).sum()), "digest": digest}


def main(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        topology = Topology.uniform(nodes, world // nodes)
        modes = ["flat", "hierarchical"] if nodes > 1 else ["flat"]
        report = {mode: serve(rank, world, topology, mode, out_dir) for mode in modes}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report, default=float))
        dist.barrier()
    finally:
        dist.destroy_process_group()
