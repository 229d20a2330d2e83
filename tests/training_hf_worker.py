"""Runs inside every spawned rank for tests/test_training.py: transformers MoE models trained through
grace_ds.deepspeed.initialize (converted to GRACE layers) against the unmodified model."""
import copy
from pathlib import Path

import torch
import torch.distributed as dist

from grace_ds.plan import PlacementPlan
from grace_ds.planners import make_plan
from grace_ds.topology import Topology
from tests.training_worker import DEVICE, max_difference

def logical_hf_experts(model: torch.nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    """Per MoE block: every logical expert's fused tensors (or their gradients), [E, ...] the same on every
    rank, from a converted model's primaries (replicas' gradients are zero by design)."""
    from grace_ds.deepspeed_moe import GraceExpertsMoE
    from grace_ds.models import find_moe_blocks

    out = {}
    for name, block in find_moe_blocks(model):
        experts = block.experts
        assert isinstance(experts, GraceExpertsMoE), type(experts)
        runtime, slots = experts._runtime, experts.deepspeed_moe.experts
        primary = runtime.plan.slot_is_primary[experts.layer, runtime.rank]
        for index, param_name in enumerate(("gate_up_proj", "down_proj")):
            example = slots.slot_tensors()[index]
            full = torch.zeros((runtime.plan.num_experts, *example.shape), dtype=torch.float64, device=DEVICE)
            for slot, expert in enumerate(slots.slot_expert.tolist()):
                if expert >= 0 and bool(primary[slot]):
                    tensor = slots.slot_weights(slot)[index]
                    full[expert] = (tensor.grad if grads else tensor).detach().double()
            dist.all_reduce(full, group=runtime.group)
            out[f"{name}.experts.{param_name}"] = full
    return out


def hf_tensors(model: torch.nn.Module, grads: bool, converted: bool) -> dict[str, torch.Tensor]:
    """Every parameter (or gradient) by the unmodified model's names; experts as [E, ...] tensors."""
    out = {n: (p.grad if grads else p).detach().double() for n, p in model.named_parameters()
           if ".experts." not in n or n.endswith(("shared_experts", ".shared_expert")) or "shared_expert" in n}
    if converted:
        out.update(logical_hf_experts(model, grads))
    else:
        out.update({n: (p.grad if grads else p).detach().double() for n, p in model.named_parameters()
                    if ".experts." in n and "shared_expert" not in n})
    return out


def grouped_differences(got: dict, want: dict) -> dict[str, float]:
    """Largest absolute difference per kind of parameter: embedding, attention, router, experts, the rest."""
    def kind(name: str) -> str:
        if "embed" in name:
            return "embedding"
        if "self_attn" in name:
            return "attention"
        if name.endswith("mlp.gate.weight"):
            return "router"
        if ".experts." in name and "shared_expert" not in name:
            return "experts"
        return "other"

    missing = sorted(set(want) ^ set(got))
    assert not missing, f"parameters not compared: {missing}"
    out: dict[str, float] = {}
    for name in want:
        out[kind(name)] = max(out.get(kind(name), 0.0), max_difference(got[name], want[name]))
    return out


def check_hf_training(rank: int, world: int, topology: Topology, out_dir: str, families: list[str]) -> dict:
    """A converted transformers model under grace_ds.deepspeed.initialize (a GRACE plan with replicas,
    ZeRO 0 and 2, clipping on) against the unmodified model trained on one process on every rank's
    batch with torch's SGD and clip_grad_norm_: gradients of the first step, parameters after 1 and 10."""
    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.deepspeed_training import runtimes_of
    from grace_ds.routing_stats import RoutingStats
    from grace_ds.models import find_moe_blocks
    from tests.tiny_models import tiny_model

    steps, clip, lr = 10, 0.05, 0.2
    results = {}
    for family in families:
        reference = tiny_model(family).to(DEVICE).train()
        ids = [torch.randint(3, 128, (2 * world, 12), generator=torch.Generator().manual_seed(50 + s)).to(DEVICE)
               for s in range(steps)]
        blocks = find_moe_blocks(reference)
        recorder = RoutingStats(len(blocks), int(blocks[0][1].experts.gate_up_proj.shape[0]),
                                reference.config.num_experts_per_tok).attach_to_routers(blocks)
        with torch.no_grad():
            reference(ids[0])
        recorder.detach()
        plan_path = Path(out_dir, f"plan-{family}.json")
        if rank == 0:
            make_plan("grace", recorder.to_profile(reduce=False), topology, replica_slots=1).save(plan_path)
        dist.barrier()
        start = copy.deepcopy(reference)
        optimizer = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
        expected, expected_grads = {}, None
        for step in range(steps):
            optimizer.zero_grad()
            reference(ids[step], labels=ids[step]).loss.backward()
            if step == 0:
                expected_grads = hf_tensors(reference, True, False)
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
            optimizer.step()
            if step + 1 in (1, steps):
                expected[step + 1] = hf_tensors(reference, False, False)
        mine = slice(rank * 2, rank * 2 + 2)
        modes = ["flat"] + ["hierarchical"] * (topology.num_nodes > 1)
        # The first family once more with transformers' gradient checkpointing (the MoE blocks recomputed
        # in the backward, exchanges included), against the same reference trained without it.
        # And once from its checkpoint directory, each rank reading only the dense weights and its experts.
        cases = [(mode, stage, False, False) for mode in modes for stage in ((0, 2) if family == families[0] else (0,))]
        cases += [(modes[-1], 0, True, False), (modes[-1], 0, False, True)] * (family == families[0])
        checkpoint = Path(out_dir, f"checkpoint-{family}")
        if rank == 0:
            start.save_pretrained(checkpoint)
        dist.barrier()
        for mode, stage, recompute, from_directory in cases:
            model = str(checkpoint) if from_directory else copy.deepcopy(start)
            if recompute:
                model.gradient_checkpointing_enable()
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": clip,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "grace_moe": {"plan": str(plan_path), "communication": mode}}
            engine, *_ = grace_deepspeed.initialize(
                model, config,
                optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.01))
            model = engine.module
            entry, apart, routed = {}, [], []
            runtimes_of(engine.module)[0].observers.append(lambda *call: routed.append(1))  # MoE calls
            for step in range(steps):
                loss = engine(ids[step][mine], labels=ids[step][mine]).loss
                engine.backward(loss)
                if step == 0 and stage == 0:  # ZeRO 2 keeps reduced gradients in its partitions only
                    entry["gradients"] = grouped_differences(hf_tensors(model, True, True), expected_grads)
                engine.step()
                apart.append(engine.max_replica_difference())
                if step + 1 in (1, steps):
                    entry[f"after_{step + 1}"] = grouped_differences(hf_tensors(model, False, True), expected[step + 1])
            entry["replicas_apart"] = max(apart)
            entry["replicated_experts"] = int((PlacementPlan.load(plan_path).copies_per_expert() > 1).sum())
            entry["recomputed"] = bool(getattr(model, "is_gradient_checkpointing", False))
            entry["moe_calls_per_step"] = len(routed) / steps
            if from_directory:
                entry["skipped_expert_bytes"] = model.grace_load.skipped_expert_bytes
            results[f"{family}/{mode}/zero{stage}" + ("/gradient-checkpointing" if recompute else "")
                    + ("/from-directory" if from_directory else "")] = entry
    return results
