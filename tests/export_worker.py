"""Runs inside every spawned gloo rank for tests/test_export.py: a transformers checkpoint loaded, converted
by GRACE (serving, and training under grace_ds.deepspeed.initialize with replicas), trained, and written
back with grace_ds.deepspeed.save_pretrained; rank 0 loads the directories with plain transformers."""
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grace_ds.logical_nodes import join_logical_node
from grace_ds.plan import PlacementPlan
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology
from tests.training_hf_worker import grouped_differences
from tests.training_worker import DEVICE, max_difference

STEPS, CLIP, LR = 3, 0.05, 0.2
FAMILIES = ["mixtral", "deepseek_v3"]  # deepseek_v3: shared experts and a router buffer beside the experts


def skewed_plan(topology: Topology, num_layers: int, num_experts: int, top_k: int, path: Path, rank: int):
    """A GRACE plan with replicas: experts 0 and 1 are hot in the profile, so the planner copies them."""
    if rank == 0:
        generator = torch.Generator().manual_seed(7)
        first = torch.where(torch.rand(4096, num_layers, generator=generator) < 0.6,
                            torch.randint(0, 2, (4096, num_layers), generator=generator),
                            torch.randint(0, num_experts, (4096, num_layers), generator=generator))
        second = (first + 1 + torch.randint(0, num_experts - 1, first.shape, generator=generator)) % num_experts
        ids = torch.stack([first, second], dim=-1)[..., :top_k]  # distinct picks per token
        make_plan("grace", RoutingProfile.from_topk_ids(ids, num_experts), topology, replica_slots=1).save(path)
    dist.barrier()
    return PlacementPlan.load(path)


def files_equal(a: Path, b: Path) -> dict:
    """The two checkpoints' safetensors: the same names, every tensor the same bits, the same file bytes."""
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    same_bits = set(left) == set(right) and all(
        left[k].dtype == right[k].dtype and left[k].shape == right[k].shape
        and torch.equal(left[k].view(torch.uint8), right[k].view(torch.uint8)) for k in left)
    return {"same_names": set(left) == set(right), "same_bits": same_bits,
            "same_bytes": (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()}


def loaded_as_unmodified(directory: Path, reference: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Plain transformers loads `directory`: what it missed or did not expect, whether any GRACE module is
    left, its weights and logits against `reference` (the same model trained without GRACE)."""
    loaded, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    loaded = loaded.to(DEVICE)
    want = {k: v.detach().double() for k, v in reference.state_dict().items()}
    got = {k: v.detach().double() for k, v in loaded.state_dict().items()}
    with torch.no_grad():
        logits = max_difference(loaded.eval()(ids).logits.double(), reference.eval()(ids).logits.double())
    return {"class": type(loaded).__name__ == type(reference).__name__,
            "loading": {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")},
            "same_keys": set(got) == set(want),
            "grace_modules": sum(hasattr(m, "_runtime") for m in loaded.modules()),
            "weights": grouped_differences(got, want) if set(got) == set(want) else None,
            "logits": logits}


def check_family(rank: int, world: int, topology: Topology, out: Path, family: str) -> dict:
    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.models import convert_model, find_moe_blocks
    from grace_ds.models.export import logical_expert_weights
    from grace_ds.runtime import GraceRuntime
    from tests.tiny_models import tiny_model

    original = out / f"{family}-original"
    if rank == 0:
        tiny_model(family).save_pretrained(original)
    dist.barrier()
    start = AutoModelForCausalLM.from_pretrained(original).to(DEVICE)  # a user's checkpoint in
    config = start.config
    num_experts = int(find_moe_blocks(start)[0][1].experts.gate_up_proj.shape[0])
    plan = skewed_plan(topology, config.num_hidden_layers, num_experts, config.num_experts_per_tok,
                       out / f"plan-{family}.json", rank)
    report = {"replicated_experts": int((plan.copies_per_expert() > 1).sum())}
    ids = [torch.randint(3, 128, (2 * world, 12), generator=torch.Generator().manual_seed(60 + s)).to(DEVICE)
           for s in range(STEPS + 1)]

    # Serving conversion (GraceExperts), exported as converted; its replicas are spoilt first: the export
    # reads each expert from its primary copy (training keeps replicas equal to it, so they never tell).
    served = copy.deepcopy(start)
    runtime = GraceRuntime(plan, device=DEVICE)
    convert_model(served, runtime)
    with torch.no_grad():
        for layer, slots in runtime.slot_modules.items():
            for slot, expert in enumerate(runtime.local_slots(layer).tolist()):
                if expert >= 0 and not bool(plan.slot_is_primary[layer, runtime.rank, slot]):
                    for tensor in slots.slot_weights(slot):
                        tensor.add_(1.0)
    grace_deepspeed.save_pretrained(served, out / f"{family}-served")

    # Training conversion under deepspeed.initialize: exported before any step, then after STEPS steps.
    engine, *_ = grace_deepspeed.initialize(
        copy.deepcopy(start).train(), {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": CLIP,
                               "zero_optimization": {"stage": 0}, "grace_moe": {"plan": str(out / f"plan-{family}.json")}},
        optimizer=lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=0.01))
    grace_deepspeed.save_pretrained(engine, out / f"{family}-converted")
    mine = slice(rank * 2, rank * 2 + 2)
    for step in range(STEPS):
        engine.backward(engine(ids[step][mine], labels=ids[step][mine]).loss)
        engine.step()
    report["replicas_apart"] = engine.max_replica_difference()
    grace_deepspeed.save_pretrained(engine, out / f"{family}-trained")

    # The unmodified model trained on one process on every rank's batch: torch's SGD and clip_grad_norm_.
    reference = copy.deepcopy(start).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9, weight_decay=0.01)
    for step in range(STEPS):
        optimizer.zero_grad()
        reference(ids[step], labels=ids[step]).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        optimizer.step()
    reference_state = reference.state_dict()
    report["moved"] = grouped_differences({k: v.double() for k, v in reference_state.items()},
                                          {k: v.double() for k, v in start.state_dict().items()})
    # Every rank gathers every expert (not only the writer).
    gathered = logical_expert_weights(engine.module)
    report["gathered_names"] = sorted(gathered)
    report["gathered_experts"] = max(max_difference(v.double(), reference_state[k].double()) for k, v in gathered.items())
    if rank == 0:
        report["converted_file"] = files_equal(original, out / f"{family}-converted")
        report["served_file"] = files_equal(original, out / f"{family}-served")
        report["converted"] = loaded_as_unmodified(out / f"{family}-converted", start, ids[STEPS])
        report["trained"] = loaded_as_unmodified(out / f"{family}-trained", reference, ids[STEPS])
        report["trained_file_names"] = files_equal(original, out / f"{family}-trained")["same_names"]
    return report


def check_bf16(rank: int, world: int, topology: Topology, out: Path) -> dict:
    """A bf16 Mixtral checkpoint, converted for training (bf16 engine, ZeRO 0): exported right after
    conversion, the very file it came from; after one step, from_pretrained in bf16 holds, bit for bit, the
    experts every rank gathers and the engine's dense weights (nothing went through another dtype)."""
    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.models import find_moe_blocks
    from grace_ds.models.export import logical_expert_weights
    from tests.tiny_models import tiny_model

    original = out / "mixtral-bf16-original"
    if rank == 0:
        tiny_model("mixtral").to(torch.bfloat16).save_pretrained(original)
    dist.barrier()
    start = AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16).to(DEVICE)
    config = start.config
    num_experts = int(find_moe_blocks(start)[0][1].experts.gate_up_proj.shape[0])
    initial = {k: v.detach().clone() for k, v in start.state_dict().items()}
    path = out / "plan-mixtral-bf16.json"
    skewed_plan(topology, config.num_hidden_layers, num_experts, config.num_experts_per_tok, path, rank)
    engine, *_ = grace_deepspeed.initialize(
        start.train(), {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": CLIP, "bf16": {"enabled": True},
                        "zero_optimization": {"stage": 0}, "grace_moe": {"plan": str(path)}},
        optimizer=lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9))
    grace_deepspeed.save_pretrained(engine, out / "mixtral-bf16-converted")
    ids = torch.randint(3, 128, (2 * world, 12), generator=torch.Generator().manual_seed(70)).to(DEVICE)
    mine = slice(rank * 2, rank * 2 + 2)
    engine.backward(engine(ids[mine], labels=ids[mine]).loss)
    engine.step()
    grace_deepspeed.save_pretrained(engine, out / "mixtral-bf16-trained")
    gathered = logical_expert_weights(engine.module)
    dense = {name: p.detach() for name, p in engine.module.named_parameters() if ".experts." not in name}
    report = {"gathered_dtypes": sorted({str(v.dtype) for v in gathered.values()})}
    if rank == 0:
        report["converted_file"] = files_equal(original, out / "mixtral-bf16-converted")
        loaded = AutoModelForCausalLM.from_pretrained(out / "mixtral-bf16-trained", dtype=torch.bfloat16).state_dict()
        report["loaded_dtypes"] = sorted({str(v.dtype) for v in loaded.values()})
        report["experts_bit_equal"] = all(torch.equal(loaded[k].cpu(), v.cpu()) for k, v in gathered.items())
        compared = [k for k in dense if k in loaded]
        report["dense_compared"] = len(compared)
        report["dense_bit_equal"] = all(torch.equal(loaded[k].cpu(), dense[k].cpu()) for k in compared)
        report["experts_moved"] = max(max_difference(v.double(), initial[k].double()) for k, v in gathered.items())
    return report


def main(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        topology = Topology.uniform(nodes, world // nodes)
        out = Path(out_dir)
        report = {family: check_family(rank, world, topology, out, family) for family in FAMILIES}
        report["bf16"] = check_bf16(rank, world, topology, out)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()
