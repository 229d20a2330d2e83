"""Runs inside every spawned gloo rank: DeepSpeed checkpoints saved under one expert layout, loaded under another.

Per ZeRO stage (0, 1, 2; and bf16 without ZeRO) a GraceMoE engine under a GRACE plan with replicas trains
3 steps and saves; fresh engines from other weights load it under another plan: with optimizer states
(remapped: the next step must be the saver's next step), and without them (every slot holds its logical
expert, the forward is the saver's, and the next step starts from the loaded weights and equals that of
a same-plan engine loaded the same way); and under the same plan (with optimizer states: the 4th step
must equal the saver's). ep_size 2 on 4 ranks (ZeRO 2 partitions split across expert-data-parallel
ranks) the same way; ZeRO's elastic checkpoints are refused by name. A checkpoint of DeepSpeed's own MoE
(ep_size 4) loads into a GraceMoE engine, and a GRACE checkpoint exported to DeepSpeed's layout
(`grace-ds checkpoint-to-deepspeed`) loads into DeepSpeed's MoE.
"""
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from grace_ds.errors import GraceInputError
from grace_ds.logical_nodes import join_logical_node
from grace_ds.plan import PlacementPlan
from grace_ds.planners import make_plan
from grace_ds.topology import Topology
from tests.training_worker import (DEVICE, EXPERTS, HIDDEN, batch, build_pair, every_batch, max_difference,
                                   parameters_of, routing_profile, train)

K, STEPS = 2, 3


def plans(world: int, topology: Topology) -> dict:
    """The saving plan (GRACE, replicas) and, per ZeRO stage, another one to load under."""
    torch.manual_seed(3)  # build_pair's gate weight: the plans see the gate's own routing
    gate_weight = torch.randn(EXPERTS, HIDDEN)
    profile = routing_profile(gate_weight, every_batch(world), K)
    saved = make_plan("grace", profile, topology, replica_slots=1)
    # The same slots (empty ones included) with every expert relabelled e -> e + 1: DeepSpeed's own
    # loading would find every file it looks for and load the wrong experts without a word.
    relabelled = torch.where(saved.slot_expert >= 0, (saved.slot_expert + 1) % EXPERTS, saved.slot_expert)
    return {"saved": saved,
            0: make_plan("contiguous", profile, topology, replica_slots=1),  # empty slots, no replicas
            1: make_plan("grace", profile, topology, replica_slots=2),  # more slots a GPU
            2: dataclasses.replace(saved, slot_expert=relabelled)}


ADAM = {0: True, 1: False, 2: True}  # per ZeRO stage: AdamW (two per-element states and a step) or SGD momentum


def engine_for(plan, stage: int, rank: int, seed: int = 11, grace: bool = True, dtype: str = "fp32",
               elastic: bool = False, ep_size: int | None = None):
    reference, net, _ = build_pair(K, plan, 0.01, "flat", ep_size or dist.get_world_size(), seed=seed, set_groups=False)
    net = net if grace else reference
    if dtype == "bf16":
        net = net.to(torch.bfloat16)
    return train(net, grace, stage, 0, rank, dtype, adam=ADAM[stage] and dtype == "fp32",
                 zero={"elastic_checkpoint": True} if elastic else None)["engine"], net


def inputs(net, rank: int, number: int) -> torch.Tensor:
    return batch(rank, number).to(net.inp.weight.dtype)


def step(engine, rank: int, number: int) -> None:
    loss = engine(inputs(engine.module, rank, number))
    engine.backward(loss)
    engine.step()


def forward(net, rank: int) -> torch.Tensor:
    with torch.no_grad():
        return net(inputs(net, rank, 99)).detach()


def slot_difference(net, experts: torch.Tensor) -> float:
    """Largest difference between any copy this rank holds (replicas included) and its logical expert."""
    layer = net.moe.deepspeed_moe
    worst = 0.0
    for slot, expert in enumerate(layer.held):
        if expert >= 0:
            flat = torch.cat([p.detach().reshape(-1).double() for p in layer.experts.deepspeed_experts[str(slot)].parameters()])
            worst = max(worst, max_difference(flat, experts[expert]))
    return worst


def differences(a: dict, b: dict) -> dict:
    return {name: max_difference(a[name], b[name]) for name in a}


def loaded(engine, net, saved: dict, saved_forward: torch.Tensor, rank: int) -> dict:
    return {"parameters": differences(parameters_of(net), saved), "slots": slot_difference(net, saved["experts"]),
            "forward": max_difference(forward(net, rank), saved_forward),
            "replicas_apart": engine.max_replica_difference(), "copies": int((net.moe.deepspeed_moe._runtime.plan
                                                                            .copies_per_expert() > 1).sum())}


def refused(load) -> str:
    try:
        load()
    except GraceInputError as error:
        return str(error)
    return ""


def save_between_steps(saver, net, rank: int, checkpoint: str, at_save=None) -> tuple[dict, torch.Tensor, dict]:
    """STEPS steps, the checkpoint (tag "t"), `at_save()` if given, one more step: (saved parameters, saved
    forward, parameters after the saver's next step)."""
    for number in range(1, STEPS + 1):
        step(saver, rank, number)
    saved, saved_forward = parameters_of(net), forward(net, rank)
    saver.save_checkpoint(checkpoint, tag="t")
    if at_save is not None:
        at_save()
    step(saver, rank, STEPS + 1)
    return saved, saved_forward, parameters_of(net)


def logical_optimizer_state(net, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's states as one job-wide view: ZeRO 1/2's fp32 masters and SGD momenta (DeepSpeed's
    tensor-fragment API), or a torch AdamW's per-parameter exp_avg and exp_avg_sq (without ZeRO); the dense
    parameters' as they are, each logical expert's from its primary copy ([E, values])."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from tests.training_worker import logical_expert_tensors

    if isinstance(optimizer, torch.optim.Optimizer):
        readers = {key: (lambda param, key=key: optimizer.state[param][key]) for key in ("exp_avg", "exp_avg_sq")}
    else:
        readers = {"fp32": safe_get_full_fp32_param,
                   "momentum": lambda param: safe_get_full_optimizer_state(param, "momentum_buffer")}
        # DeepSpeed links the fragments to the optimizer's state once, at the first group's first step, when
        # later groups (the expert group) have no state yet: link again now that every group has one.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for key, read in readers.items():
        out[f"upstream/{key}"] = read(net.inp.weight).reshape(-1).double()
        out[f"gate/{key}"] = read(net.moe.deepspeed_moe.gate.wg.weight).reshape(-1).double()
        out[f"experts/{key}"] = logical_expert_tensors(net, grads=False, value=read)
    return {name: tensor.cpu() for name, tensor in out.items()}


def check_stage(stage: int, plan_set: dict, rank: int, out_dir: str, dtype: str = "fp32") -> dict:
    """bf16: the saver and the other plan only (its fp32 masters are what the case checks)."""
    checkpoint = str(Path(out_dir, f"{dtype}-zero{stage}"))
    saver, net = engine_for(plan_set["saved"], stage, rank, seed=3, dtype=dtype)
    states = {}
    snapshot = ((lambda: states.update(logical_optimizer_state(net, saver.optimizer)))
                if stage in (0, 1) and dtype == "fp32" else None)
    saved, saved_forward, continued = save_between_steps(saver, net, rank, checkpoint, snapshot)
    entry = {"record": Path(checkpoint, "t", "grace_layout.json").is_file()}
    if states:  # for the jobs of another size (resize_main, grow_main)
        torch.save({"saved": saved, "forward": saved_forward, "optimizer": states, "continued": continued},
                   Path(out_dir, f"zero{stage}-saved-rank{rank}.pt"))

    other, other_net = engine_for(plan_set[stage], stage, rank, dtype=dtype)
    initial = parameters_of(other_net)
    # Optimizer states remapped: the next step is the saver's next step.
    remapped, remapped_net = engine_for(plan_set[stage], stage, rank, dtype=dtype)
    remapped.load_checkpoint(checkpoint, tag="t")
    entry["with_states"] = loaded(remapped, remapped_net, saved, saved_forward, rank)
    step(remapped, rank, STEPS + 1)
    entry["with_states"]["continued"] = differences(parameters_of(remapped_net), continued)
    entry["with_states"]["step_size"] = max(differences(continued, saved).values())
    if stage == 1 and dtype == "fp32":  # ZeRO's elastic checkpoints: merged by DeepSpeed, not remapped
        elastic, _ = engine_for(plan_set[stage], stage, rank, elastic=True)
        entry["refused"] = refused(lambda: elastic.load_checkpoint(checkpoint, tag="t"))
    other.load_checkpoint(checkpoint, tag="t", load_optimizer_states=False)
    entry["other_plan"] = loaded(other, other_net, saved, saved_forward, rank)
    step(other, rank, STEPS + 1)
    stepped = parameters_of(other_net)
    # One step moves the weights little; from stale fp32 masters (the fresh engine's) they would jump back.
    entry["other_plan"]["step_size"] = max(differences(stepped, saved).values())
    entry["other_plan"]["initial_distance"] = max(differences(initial, saved).values())
    # Fresh optimizer state against the saver's: how far a continuation without the states lands.
    entry["other_plan"]["vs_saver"] = max(differences(stepped, continued).values())
    if dtype == "bf16":
        return entry
    other.load_checkpoint(checkpoint, tag="t", load_module_only=True)
    entry["module_only"] = loaded(other, other_net, saved, saved_forward, rank)

    same, same_net = engine_for(plan_set["saved"], stage, rank)  # with optimizer states: an exact continuation
    same.load_checkpoint(checkpoint, tag="t")
    entry["same_plan"] = loaded(same, same_net, saved, saved_forward, rank)
    step(same, rank, STEPS + 1)
    entry["same_plan"]["continued"] = differences(parameters_of(same_net), continued)

    fresh, fresh_net = engine_for(plan_set["saved"], stage, rank)  # the same step on the saved plan
    fresh.load_checkpoint(checkpoint, tag="t", load_optimizer_states=False)
    step(fresh, rank, STEPS + 1)
    entry["other_plan"]["stepped"] = differences(stepped, parameters_of(fresh_net))
    return entry


def check_expert_data_parallel(rank: int, world: int, out_dir: str) -> dict:
    """ep_size 2 on 4 ranks, ZeRO 2 (AdamW): each expert group's fp32 partition is split over its 2
    expert-data-parallel ranks, so a saved parameter may be joined from two ranks' fragments. Saved under
    a GRACE plan for 2 GPUs, loaded with its optimizer states under the contiguous plan (2 slots a GPU):
    the next step must be the saver's."""
    ep_size, stage = 2, 2
    torch.manual_seed(3)
    profile = routing_profile(torch.randn(EXPERTS, HIDDEN), every_batch(world), K)
    topology = Topology.uniform(1, ep_size)
    plan_set = {"saved": make_plan("grace", profile, topology, replica_slots=1),
                "other": make_plan("contiguous", profile, topology, replica_slots=2)}
    checkpoint = str(Path(out_dir, "expert-data-parallel"))
    saver, net = engine_for(plan_set["saved"], stage, rank, seed=3, ep_size=ep_size)
    saved, saved_forward, continued = save_between_steps(saver, net, rank, checkpoint)
    engine, other = engine_for(plan_set["other"], stage, rank, ep_size=ep_size)
    engine.load_checkpoint(checkpoint, tag="t")
    entry = loaded(engine, other, saved, saved_forward, rank)
    step(engine, rank, STEPS + 1)
    entry.update({"continued": differences(parameters_of(other), continued),
                  "step_size": max(differences(continued, saved).values()),
                  "split": _split_parameters(saver.optimizer)})
    return entry


def _split_parameters(optimizer) -> int:
    """Expert parameters of this rank whose fp32 master is split between two ranks' ZeRO partitions."""
    return sum(p._hp_mapping is not None and p._hp_mapping.lp_fragment_address.numel < p.numel()
               for group, moe in zip(optimizer.bit16_groups, optimizer.is_moe_param_group) if moe for p in group)


def check_deepspeed_moe(plan_set: dict, rank: int, out_dir: str) -> dict:
    """DeepSpeed's own MoE (ep_size 4, file id = logical expert) saved, loaded into GraceMoE."""
    checkpoint = str(Path(out_dir, "deepspeed"))
    reference, _, _ = build_pair(K, plan_set["saved"], 0.01, "flat", dist.get_world_size(), set_groups=False)
    train(reference, False, 1, STEPS, rank, checkpoint=checkpoint)
    saved, saved_forward = parameters_of(reference), forward(reference, rank)
    engine, net = engine_for(plan_set["saved"], 1, rank)
    entry = {"refused": refused(lambda: engine.load_checkpoint(checkpoint, tag="t"))}
    engine.load_checkpoint(checkpoint, tag="t", load_optimizer_states=False)
    entry.update(loaded(engine, net, saved, saved_forward, rank))
    return entry


def check_export(rank: int, out_dir: str, plan_set: dict) -> dict:
    """The ZeRO-1 GRACE checkpoint in DeepSpeed's layout (`grace-ds checkpoint-to-deepspeed`), loaded by
    DeepSpeed's own MoE (ep_size 4)."""
    from grace_ds.cli import main as cli

    source, target = Path(out_dir, "fp32-zero1", "t"), Path(out_dir, "exported", "t")
    saver, net = engine_for(plan_set["saved"], 1, rank)
    saver.load_checkpoint(str(source.parent), tag="t")
    saved, saved_forward = parameters_of(net), forward(net, rank)
    if rank == 0:
        target.parent.mkdir()
    exported = cli(["checkpoint-to-deepspeed", str(source), "--out", str(target)]) if rank == 0 else 0
    dist.barrier()
    engine, reference = engine_for(plan_set["saved"], 1, rank, grace=False)
    engine.load_checkpoint(str(target.parent), load_optimizer_states=False)  # the tag from `latest`
    return {"exit_code": exported, "parameters": differences(parameters_of(reference), saved),
            "forward": max_difference(forward(reference, rank), saved_forward)}


def check_transformers(rank: int, world: int, topology: Topology, out_dir: str) -> dict:
    """A converted Mixtral (2 MoE layers of GraceExpertsMoE, grace_ds.deepspeed.initialize, ZeRO 1) saved
    under a GRACE plan with replicas, loaded with its optimizer states under the contiguous plan, then one
more step against the saver's."""
    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.routing_profile import RoutingProfile
    from tests.tiny_models import tiny_model
    from tests.training_hf_worker import logical_hf_experts

    ids = [torch.randint(3, 128, (2 * world, 12), generator=torch.Generator().manual_seed(50 + s)).to(DEVICE)
           for s in range(3)]
    mine = slice(rank * 2, rank * 2 + 2)
    # A skewed routing of its 2 layers (hot experts 0 and 1): the GRACE plan replicates them.
    picks = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1]).expand(512, EXPERTS), K,
                              generator=torch.Generator().manual_seed(5)).view(256, 2, K)
    profile = RoutingProfile.from_topk_ids(picks, EXPERTS)
    paths = {policy: Path(out_dir, f"plan-mixtral-{policy}.json") for policy in ("grace", "contiguous")}
    if rank == 0:
        for policy, path in paths.items():
            make_plan(policy, profile, topology, replica_slots=1).save(path)
    dist.barrier()

    def engine(policy: str, seed: int):
        net = tiny_model("mixtral", seed).to(DEVICE).train()
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.05, "zero_optimization": {"stage": 1},
                  "zero_allow_untested_optimizer": True, "grace_moe": {"plan": str(paths[policy])}}
        optimizer = lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=0.01)  # noqa: E731
        return grace_deepspeed.initialize(net, config, optimizer=optimizer)[0], net

    def state(net):
        with torch.no_grad():
            loss = net(ids[2][mine], labels=ids[2][mine]).loss
        return logical_hf_experts(net, grads=False), loss

    checkpoint = str(Path(out_dir, "mixtral"))
    saver, net = engine("grace", 0)
    for number in range(2):
        saver.backward(saver(ids[number][mine], labels=ids[number][mine]).loss)
        saver.step()
    saver.save_checkpoint(checkpoint, tag="t")
    (saved, saved_loss), dense = state(net), {n: p.detach().clone() for n, p in net.named_parameters() if ".experts." not in n}
    saver.backward(saver(ids[2][mine], labels=ids[2][mine]).loss)
    saver.step()
    continued, continued_dense = state(net)[0], {n: p.detach().clone() for n, p in net.named_parameters() if n in dense}
    loader, other = engine("contiguous", 1)
    loader.load_checkpoint(checkpoint, tag="t")  # optimizer states remapped too
    experts, loss = state(other)
    entry = {"experts": max(max_difference(experts[name], saved[name]) for name in saved),
             "dense": max(max_difference(p, dense[n]) for n, p in other.named_parameters() if n in dense),
             "loss": max_difference(loss, saved_loss), "layers": len(saved) // 2,
             "replicas_apart": loader.max_replica_difference(),
             "replicated": int((PlacementPlan.load(paths["grace"]).copies_per_expert() > 1).sum())}
    loader.backward(loader(ids[2][mine], labels=ids[2][mine]).loss)
    loader.step()  # the saver's next step, with the saved momentum
    experts = state(other)[0]
    entry["continued"] = max(max(max_difference(experts[name], continued[name]) for name in continued),
                             max(max_difference(p, continued_dense[n]) for n, p in other.named_parameters()
                                 if n in continued_dense))
    entry["step_size"] = max(max_difference(continued[name], saved[name]) for name in saved)
    return entry


def main(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        plan_set = plans(world, Topology.uniform(nodes, world // nodes))
        report = {f"zero{stage}": check_stage(stage, plan_set, rank, out_dir) for stage in (0, 1, 2)}
        report["bf16-zero0"] = check_stage(0, {"saved": plan_set["saved"], 0: plan_set[2]}, rank, out_dir, "bf16")
        report["expert_data_parallel"] = check_expert_data_parallel(rank, world, out_dir)
        report["deepspeed_moe"] = check_deepspeed_moe(plan_set, rank, out_dir)
        report["export"] = check_export(rank, out_dir, plan_set)
        report["transformers"] = check_transformers(rank, world, Topology.uniform(nodes, world // nodes), out_dir)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def resize_main(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    """A job of another size (2 ranks as 2 nodes x 1) loads main's checkpoints of 4 ranks under a GRACE plan
    for its 2 GPUs, optimizer states included: ZeRO 1 (partitions cut anew) and ZeRO 0 (torch's AdamW, states
    taken by name from the saver ranks' files). Every copy holds its logical expert, the forward is the saver's,
    every optimizer state the saver's. The ZeRO-0 job saves again at once, for grow_main."""
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        torch.manual_seed(3)
        profile = routing_profile(torch.randn(EXPERTS, HIDDEN), every_batch(world), K)
        plan = make_plan("grace", profile, Topology.uniform(nodes, world // nodes), replica_slots=1)
        out = {}
        for stage in (1, 0):
            reference = torch.load(Path(out_dir, f"zero{stage}-saved-rank{rank}.pt"))
            engine, net = engine_for(plan, stage, rank)
            engine.load_checkpoint(str(Path(out_dir, f"fp32-zero{stage}")), tag="t")
            entry = loaded(engine, net, reference["saved"], reference["forward"], rank)
            entry["optimizer"] = differences(logical_optimizer_state(net, engine.optimizer), reference["optimizer"])
            entry["state_size"] = min(float(v.abs().max()) for v in reference["optimizer"].values())
            if stage == 0:
                engine.save_checkpoint(str(Path(out_dir, "resized-zero0")), tag="t")
            step(engine, rank, STEPS + 1)
            entry["step_size"] = max(differences(parameters_of(net), reference["saved"]).values())
            out[f"zero{stage}"] = entry
        Path(out_dir, f"resize-rank{rank}.json").write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def grow_main(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    """A larger job (4 ranks as 2 x 2) loads resize_main's 2-rank ZeRO-0 checkpoint under the contiguous plan
    with replica slots: its ranks 2 and 3 have no optimizer file of their own there. Every weight and AdamW
    state is main's 4-rank saver's (the states went 4 -> 2 -> 4 ranks through three layouts), and the next
    step is the saver's next step."""
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        plan = plans(world, Topology.uniform(nodes, world // nodes))[0]
        reference = torch.load(Path(out_dir, f"zero0-saved-rank{rank}.pt"))
        engine, net = engine_for(plan, 0, rank)
        engine.load_checkpoint(str(Path(out_dir, "resized-zero0")), tag="t")
        entry = loaded(engine, net, reference["saved"], reference["forward"], rank)
        entry["optimizer"] = differences(logical_optimizer_state(net, engine.optimizer), reference["optimizer"])
        entry["groups"] = [group.get("name") for group in engine.optimizer.param_groups]
        step(engine, rank, STEPS + 1)
        entry["continued"] = differences(parameters_of(net), reference["continued"])
        entry["step_size"] = max(differences(reference["continued"], reference["saved"]).values())
        Path(out_dir, f"grow-rank{rank}.json").write_text(json.dumps(entry))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def one_rank_main(rank: int, port: int, out_dir: str) -> None:
    """main's per-stage and converted-Mixtral checks in a job of one rank (tests/test_checkpoint_one_rank.py)."""
    _, backend = join_logical_node(rank, 1, 1, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        plan_set = plans(1, Topology.uniform(1, 1))
        report = {f"zero{stage}": check_stage(stage, plan_set, rank, out_dir) for stage in (0, 1, 2)}
        report["bf16-zero0"] = check_stage(0, {"saved": plan_set["saved"], 0: plan_set[2]}, rank, out_dir, "bf16")
        report["transformers"] = check_transformers(rank, 1, Topology.uniform(1, 1), out_dir)
        Path(out_dir, "one-rank.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()
