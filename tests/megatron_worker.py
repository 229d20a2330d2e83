"""Runs inside every spawned gloo rank: GRACE's megatron layer against megatron-core's own MoELayer.

Each rank builds megatron's MoELayer (expert-parallel over all ranks, contiguous experts) and the GRACE
layer from a plan, with the same router and every logical expert's weights, feeds both its own tokens
and compares. Also records routing through the profiling hook, lists the GRACE layer's and megatron's
checkpoint entries (which logical expert, which copy) for the parent to check, and moves checkpoints
between the two layers."""
import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from grace_ds.logical_nodes import join_logical_node
from grace_ds.megatron import grace_layer_spec, top_k_from_routing
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.routing_stats import RoutingStats
from grace_ds.runtime import GraceRuntime
from grace_ds.topology import Topology
from patches import megatron_core_cpu

HIDDEN, INNER, EXPERTS, TOP_K, SEQ, BATCH = 16, 24, 8, 2, 6, 2
# GRACE_TEST_DEVICE=cuda runs the same checks over NCCL, one GPU a rank (scripts/gpu_exactness.sh).
DEVICE = torch.device(os.environ.get("GRACE_TEST_DEVICE", "cpu"))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def checkpoint_round_trip(saved_layer, spec, config, profile, topology, rank, x, expected, directory) -> float:
    """megatron dist-checkpointing save of a GRACE layer, load into a layer of another plan (fresh
    weights); its output against the reference's."""
    from megatron.core import dist_checkpointing

    if rank == 0:
        directory.mkdir()
    dist.barrier()
    dist_checkpointing.save(saved_layer.sharded_state_dict("mlp."), str(directory))
    runtime = GraceRuntime(make_plan("contiguous", profile, topology, replica_slots=1), rank=rank,
                           communication="flat", device=DEVICE)
    torch.manual_seed(999)
    fresh = grace_layer_spec(spec, runtime).submodules.mlp(config, layer_number=1).to(DEVICE).eval()
    dist_checkpointing.load(fresh.sharded_state_dict("mlp."), str(directory))  # fills the slots in place
    with torch.no_grad():
        return relative_error(fresh(x)[0], expected)


def saved_entries(sharded: dict) -> list[list]:
    """[key, global offset, replica id] of every expert tensor or object a sharded state dict files
    (factories, megatron's SwiGLU ones and GRACE's fused slots, built into the tensors they save)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    def built(entry) -> list:
        if not isinstance(entry, ShardedTensorFactory):
            return [entry]
        made = entry.build()  # megatron's build a list, GRACE's fused slots a dict of per-slot entries
        return [item for part in (made.values() if isinstance(made, dict) else made) for item in built(part)]

    out = []
    for entry in sharded.values():
        for item in built(entry):
            if ".experts." in item.key:
                out.append([item.key, list(item.global_offset), list(item.replica_id)])
    return out


def checkpoint_interchange(reference, spec, config, plan, rank, x, expected, directory: Path) -> dict[str, float]:
    """dist-checkpointing between megatron's own MoELayer and the GRACE layer (a plan with replicas), both
    ways and with singleton shards: each loaded layer's output against the reference's, and how far
    the loaded copies of any expert are apart."""
    from megatron.core import dist_checkpointing

    def fresh_grace():
        runtime = GraceRuntime(plan, rank=rank, communication="hierarchical", device=DEVICE)
        torch.manual_seed(1234 + rank)
        return runtime, grace_layer_spec(spec, runtime).submodules.mlp(config, layer_number=1).to(DEVICE).eval()

    def folder(name: str) -> str:
        if rank == 0:
            (directory / name).mkdir(parents=True)
        dist.barrier()
        return str(directory / name)

    results = {}
    for singleton in (False, True):
        metadata = {"singleton_local_shards": singleton}
        tag = " singleton" if singleton else ""
        path = folder(f"megatron{'-singleton' if singleton else ''}")
        dist_checkpointing.save(reference.sharded_state_dict("mlp.", metadata=metadata), path)
        runtime, loaded = fresh_grace()
        dist_checkpointing.load(loaded.sharded_state_dict("mlp.", metadata=metadata), path)
        with torch.no_grad():
            results[f"megatron -> grace{tag}"] = relative_error(loaded(x)[0], expected)
        results[f"megatron -> grace{tag} copies apart"] = runtime.max_replica_difference()
        path = folder(f"grace{'-singleton' if singleton else ''}")
        dist_checkpointing.save(loaded.sharded_state_dict("mlp.", metadata=metadata), path)
        torch.manual_seed(4321 + rank)
        back = spec.submodules.mlp(config, layer_number=1).to(DEVICE).eval()
        state = dist_checkpointing.load(back.sharded_state_dict("mlp.", metadata=metadata), path)
        back.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()})
        with torch.no_grad():
            results[f"grace -> megatron{tag}"] = relative_error(back(x)[0], expected)
    return results


def logical_optimizer_states(layer, optimizer) -> dict[str, torch.Tensor]:
    """Adam's exp_avg and exp_avg_sq of the router and of every logical expert (from its primary), [E, ...] the
    same on every rank."""
    runtime = layer._runtime
    slots = runtime.plan.slot_expert[layer.plan_layer, runtime.rank].tolist()
    primary = runtime.plan.slot_is_primary[layer.plan_layer, runtime.rank]
    held = [(row, expert) for row, expert in enumerate(e for e in slots if e >= 0)]
    primaries = [bool(primary[slot]) for slot, expert in enumerate(slots) if expert >= 0]
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        out[f"router/{key}"] = optimizer.state[layer.router.weight][key].detach().double().cpu()
        for name in ("gate_up_proj", "down_proj"):
            state = optimizer.state[getattr(layer.experts, name)][key]
            full = torch.zeros((EXPERTS, *state.shape[1:]), dtype=torch.float64, device=DEVICE)
            for (row, expert), is_primary in zip(held, primaries):
                if is_primary:
                    full[expert] = state[row].double()
            dist.all_reduce(full)
            out[f"experts.{name}/{key}"] = full.cpu()
    return out


def optimizer_states_across_plans(spec, config, reference, fc1, fc2, profile, topology, rank, x, directory: Path,
                                  megatron_optimizer: bool = False, other_plan_slots: int = 1) -> dict:
    """The GRACE layer under a GRACE plan with replicas trains 2 Adam steps; the model and its optimizer states
    go to one megatron dist-checkpoint and load into a layer under the contiguous plan with a fresh Adam. Every
    state of every logical expert (and the router's) must be the saver's, and the next step the saver's next step.
    The optimizer: megatron's FP32Optimizer over torch's Adam (`megatron_optimizer`; its constructor needs CUDA),
    or torch's Adam through megatron's mapping functions as FP32Optimizer.sharded_state_dict calls them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    def init_states(adam) -> None:  # the states a checkpoint fills, as megatron's init_state_fn for Adam makes them
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}

    def make_optimizer(layer):
        # eps well above the smallest second moments: Adam divides by sqrt(v) + eps, so with v near 0 it would
        # magnify the plans' fp32 summation-order differences in the gradients (1e-9 here) past the bound below
        adam = torch.optim.Adam(layer.parameters(), lr=1.0, eps=1e-4)
        if not megatron_optimizer:
            return adam, adam
        settings = OptimizerConfig(optimizer="adam", lr=1.0, adam_eps=1e-4, clip_grad=0.0)
        return FP32Optimizer(adam, settings, lambda opt, config=None: init_states(opt)), adam

    def train_step(layer, optimizer, runtime) -> None:
        optimizer.zero_grad()
        layer(x)[0].pow(2).mean().backward()
        dist.all_reduce(layer.router.weight.grad)  # as megatron's DDP reduces the dense parameters' (experts:
        layer.router.weight.grad /= dist.get_world_size()  # expert data parallel, one rank each here)
        optimizer.step()
        runtime.sync_replica_weights()

    def sharded(layer, optimizer, loading: bool) -> dict:
        model = layer.sharded_state_dict("mlp.")
        if megatron_optimizer:
            return {"model": model, "optimizer": optimizer.sharded_state_dict(model, is_loading=loading)}
        if loading:
            init_states(optimizer)
        state = optimizer.state_dict()  # as FP32Optimizer.sharded_state_dict: states by the model's entries
        state["state"] = {pid: dict(param_state) for pid, param_state in state["state"].items()}  # not the live ones
        steps = [param_state.pop("step") for param_state in state["state"].values()]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model, params))
        state["state"]["common_step"] = steps[0]  # one common step
        return {"model": model, "optimizer": state}

    def load(optimizer, state: dict) -> None:
        if megatron_optimizer:
            optimizer.load_state_dict(state)
            return
        step = state["state"].pop("common_step")
        for param_state in state["state"].values():
            param_state["step"] = step.clone()
        optimizer.load_state_dict(state)

    saver_runtime, saver = grace_layer(spec, config, make_plan("grace", profile, topology, replica_slots=1), rank,
                                       "flat", reference, fc1, fc2)
    saver.train()
    saver_optimizer, saver_adam = make_optimizer(saver)
    for _ in range(2):
        train_step(saver, saver_optimizer, saver_runtime)
    saved_states, saved_weights = logical_optimizer_states(saver, saver_adam), logical_experts(saver, False)
    if rank == 0:
        directory.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(sharded(saver, saver_optimizer, False), str(directory))
    train_step(saver, saver_optimizer, saver_runtime)
    continued = logical_experts(saver, False)

    plan = make_plan("contiguous", profile, topology, replica_slots=other_plan_slots)
    runtime = GraceRuntime(plan, rank=rank, communication="flat", device=DEVICE)
    torch.manual_seed(77 + rank)
    loaded = grace_layer_spec(spec, runtime).submodules.mlp(config, layer_number=1).to(DEVICE).train()
    optimizer, adam = make_optimizer(loaded)
    load(optimizer, dist_checkpointing.load(sharded(loaded, optimizer, True), str(directory))["optimizer"])
    entry = {"weights": float((logical_experts(loaded, False) - saved_weights).abs().max()),
             "states": {name: float((value - saved_states[name]).abs().max())
                        for name, value in logical_optimizer_states(loaded, adam).items()},
             "state_size": min(float(v.abs().max()) for v in saved_states.values()),
             "replicated_experts": int((saver_runtime.plan.copies_per_expert() > 1).sum()),
             "slots_per_gpu": [saver_runtime.plan.slots_per_gpu, plan.slots_per_gpu],
             "optimizer": type(optimizer).__name__}
    train_step(loaded, optimizer, runtime)
    entry["continued"] = float((logical_experts(loaded, False) - continued).abs().max())
    entry["step_size"] = float((continued - saved_weights).abs().max())
    return entry


def one_rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank (one GPU): megatron's own FP32Optimizer through the GRACE layer's checkpoint, across plans of
    other slot counts (tests/test_megatron_one_rank.py)."""
    join_logical_node(rank, 1, 1, port, DEVICE.type)
    handle = megatron_core_cpu.apply() if DEVICE.type == "cpu" else contextlib.nullcontext()
    try:
        from megatron.core import parallel_state
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

        parallel_state.initialize_model_parallel(expert_model_parallel_size=1)
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=INNER, moe_ffn_hidden_size=INNER,
            num_attention_heads=2, num_moe_experts=EXPERTS, moe_router_topk=TOP_K,
            moe_token_dispatcher_type="alltoall", add_bias_linear=False, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, use_cpu_initialization=True, params_dtype=torch.float32,
            expert_model_parallel_size=1, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
        spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
        torch.manual_seed(100)
        reference = spec.submodules.mlp(config, layer_number=1).to(DEVICE).eval()
        with torch.no_grad():
            reference.router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(5)))
            x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(7)).to(DEVICE)
            probs, routing_map = reference.router(x)
        fc1 = torch.stack([e.linear_fc1.weight.detach() for e in reference.experts.local_experts])
        fc2 = torch.stack([e.linear_fc2.weight.detach() for e in reference.experts.local_experts])
        ids = top_k_from_routing(probs, routing_map, TOP_K)[0]
        profile = RoutingProfile.from_topk_ids(ids.view(-1, 1, TOP_K).cpu(), EXPERTS)
        report = optimizer_states_across_plans(spec, config, reference, fc1, fc2, profile, Topology.uniform(1, 1), rank,
                                               x, Path(out_dir, "optimizer"), megatron_optimizer=True,
                                               other_plan_slots=2)
        Path(out_dir, "one-rank.json").write_text(json.dumps(report))
    finally:
        handle.__exit__(None, None, None)
        dist.destroy_process_group()


def online_switches(layer, reference, runtime: GraceRuntime, rank: int) -> dict:
    """The GRACE layer served with online re-planning while its inputs drift towards expert 0: every
    step's output against megatron's own layer, and how many copies moved."""
    from grace_ds.online import OnlineReplanner, OnlineSettings

    settings = OnlineSettings(window_steps=2, window_buckets=2, interval_steps=2, plan_delay_steps=1,
                              drift_threshold=0.0, max_moves_per_step=3, sample_tokens=64)
    replanner = OnlineReplanner(runtime, settings).attach(layer)
    hot = reference.router.weight.detach()[0]
    errors = []
    for step in range(10):
        x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(100 * step + rank)).to(DEVICE)
        x = x + (0.0 if step < 3 else 1.5) * hot / hot.norm()
        with torch.no_grad():
            errors.append(relative_error(layer(x)[0], reference(x)[0]))
    replanner.detach()
    return {"errors": errors, "moves": sum(r.get("moves", 0) for r in replanner.history)}


def grace_layer(spec, config, plan, rank: int, mode: str, reference, fc1: torch.Tensor, fc2: torch.Tensor):
    """(runtime, GRACE layer) serving `plan` with the reference's router and every logical expert's weights."""
    runtime = GraceRuntime(plan, rank=rank, communication=mode, device=DEVICE)
    layer = grace_layer_spec(spec, runtime).submodules.mlp(config, layer_number=1).to(DEVICE)
    layer.router.load_state_dict(reference.router.state_dict())
    layer.load_logical_experts(fc1, fc2)
    return runtime, layer


def logical_experts(layer, grads: bool) -> torch.Tensor:
    """[E, 2I*H + H*I] every logical expert's weights (or gradients), the same on every rank: megatron's
    SequentialMLP holds experts rank * E/world + i; the GRACE layer's primaries hold theirs."""
    width = 2 * INNER * HIDDEN + HIDDEN * INNER
    out = torch.zeros(EXPERTS, width, dtype=torch.float64, device=DEVICE)

    def value(param):
        return (param.grad if grads else param).detach().reshape(-1).double()

    if hasattr(layer, "_runtime"):
        runtime = layer._runtime
        slots = runtime.plan.slot_expert[layer.plan_layer, runtime.rank].tolist()
        primary = runtime.plan.slot_is_primary[layer.plan_layer, runtime.rank]
        tensors = layer.experts.slot_tensors() if not grads else [t.grad for t in layer.experts.slot_tensors()]
        for slot, expert in enumerate(slots):
            if expert >= 0 and bool(primary[slot]):
                out[expert] = torch.cat([v.reshape(-1).double() for v in layer.experts.copy_views(tensors, slot)])
    else:
        for local, expert in enumerate(layer.experts.local_experts):
            out[dist.get_rank() * len(layer.experts.local_experts) + local] = torch.cat(
                [value(expert.linear_fc1.weight), value(expert.linear_fc2.weight)])
    dist.all_reduce(out)
    return out


def gradients_and_step(reference, spec, config, profile, topology, rank, x) -> dict:
    """Training through the GRACE layer against megatron's MoELayer (aux loss on): input, router and expert
    gradients, then one SGD step (replicas synced after it) and the weights it gives."""
    lr = 0.5
    results = {}
    reference.train()
    x_ref = x.clone().requires_grad_(True)
    reference.zero_grad()
    reference(x_ref)[0].pow(2).mean().backward()
    want = {"input": x_ref.grad, "router": reference.router.weight.grad, "experts": logical_experts(reference, True)}
    with torch.no_grad():
        for param in reference.parameters():
            if param.grad is not None:
                param -= lr * param.grad
    want_after = logical_experts(reference, False)
    with torch.no_grad():  # back to the weights before the step, for the next comparison
        for param in reference.parameters():
            if param.grad is not None:
                param += lr * param.grad
    fc1 = gathered(torch.stack([e.linear_fc1.weight.detach() for e in reference.experts.local_experts]))
    fc2 = gathered(torch.stack([e.linear_fc2.weight.detach() for e in reference.experts.local_experts]))
    for policy in ("contiguous", "grace"):
        plan = make_plan(policy, profile, topology, replica_slots=1)
        for mode in ("flat", "hierarchical"):
            runtime, layer = grace_layer(spec, config, plan, rank, mode, reference, fc1, fc2)
            layer.train()
            x_grace = x.clone().requires_grad_(True)
            layer(x_grace)[0].pow(2).mean().backward()
            got = {"input": x_grace.grad, "router": layer.router.weight.grad, "experts": logical_experts(layer, True)}
            entry = {name: float((got[name].double() - want[name].double()).abs().max()) for name in want}
            with torch.no_grad():
                for param in layer.parameters():
                    if param.grad is not None:
                        param -= lr * param.grad
            runtime.sync_replica_weights()
            entry["after_step"] = float((logical_experts(layer, False) - want_after).abs().max())
            entry["replicas_apart"] = runtime.max_replica_difference()
            entry["replicated_experts"] = int((plan.copies_per_expert() > 1).sum())
            results[f"{policy}/{mode}"] = entry
    return results


def main(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    join_logical_node(rank, world, nodes, port, DEVICE.type)
    handle = megatron_core_cpu.apply() if DEVICE.type == "cpu" else contextlib.nullcontext()
    try:
        from megatron.core import parallel_state
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

        parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
        topology = Topology.uniform(nodes, world // nodes)
        report = {"errors": {}, "checkpoint": {}}
        for dispatcher in ("alltoall", "allgather"):
            config = TransformerConfig(
                num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=INNER, moe_ffn_hidden_size=INNER,
                num_attention_heads=2, num_moe_experts=EXPERTS, moe_router_topk=TOP_K,
                moe_token_dispatcher_type=dispatcher, add_bias_linear=False, gated_linear_unit=True,
                activation_func=torch.nn.functional.silu, use_cpu_initialization=True, params_dtype=torch.float32,
                expert_model_parallel_size=world, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
            spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
            torch.manual_seed(100 + rank)  # every rank's experts differ
            reference = spec.submodules.mlp(config, layer_number=1).to(DEVICE).eval()
            with torch.no_grad():
                reference.router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(5)))
            fc1 = gathered(torch.stack([e.linear_fc1.weight.detach() for e in reference.experts.local_experts]))
            fc2 = gathered(torch.stack([e.linear_fc2.weight.detach() for e in reference.experts.local_experts]))
            x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(7 + rank)).to(DEVICE)
            recorder = RoutingStats(1, EXPERTS, TOP_K).attach_to_megatron_routers([reference])
            with torch.no_grad():
                expected = reference(x)[0]
            recorder.detach()
            profile = recorder.to_profile()
            report.setdefault("profiled_tokens", {})[dispatcher] = int(profile.num_tokens[0])
            report.setdefault("profiled_pairs", {})[dispatcher] = float(profile.expert_load.sum())
            with torch.no_grad():
                probs, routing_map = reference.router(x)
            ids = gathered(top_k_from_routing(probs, routing_map, TOP_K)[0])
            plan_profile = RoutingProfile.from_topk_ids(ids.view(-1, 1, TOP_K).cpu(), EXPERTS)
            for policy in ("contiguous", "eplb", "grace"):
                plan = make_plan(policy, plan_profile, topology, replica_slots=1)
                for mode in ("flat", "hierarchical"):
                    runtime, layer = grace_layer(spec, config, plan, rank, mode, reference, fc1, fc2)
                    layer.eval()
                    with torch.no_grad():
                        out = layer(x)[0]
                    report["errors"][f"{dispatcher}/{policy}/{mode}"] = relative_error(out, expected)
                if dispatcher == "alltoall":
                    entries = layer.sharded_state_dict("decoder.layers.0.mlp.")
                    report["checkpoint"][policy] = saved_entries(entries)
            if dispatcher == "alltoall":  # saved under the last (grace) plan, loaded under another
                report["errors"]["checkpoint grace -> contiguous"] = checkpoint_round_trip(
                    layer, spec, config, plan_profile, topology, rank, x, expected, Path(out_dir, "checkpoint"))
                report["checkpoint"]["megatron"] = saved_entries(reference.sharded_state_dict("decoder.layers.0.mlp."))
                report["interchange"] = checkpoint_interchange(reference, spec, config, plan, rank, x, expected,
                                                               Path(out_dir, "interchange"))
                report["online"] = online_switches(layer, reference, runtime, rank)
                report["optimizer_states"] = optimizer_states_across_plans(
                    spec, config, reference, fc1, fc2, plan_profile, topology, rank, x, Path(out_dir, "optimizer"))
        # Training, with megatron's load-balancing loss on: gradients and a step against MoELayer's.
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=INNER, moe_ffn_hidden_size=INNER,
            num_attention_heads=2, num_moe_experts=EXPERTS, moe_router_topk=TOP_K,
            moe_token_dispatcher_type="alltoall", add_bias_linear=False, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, use_cpu_initialization=True, params_dtype=torch.float32,
            expert_model_parallel_size=world, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)
        torch.manual_seed(100 + rank)
        reference = spec.submodules.mlp(config, layer_number=1).to(DEVICE)
        with torch.no_grad():
            reference.router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(5)))
        report["training"] = gradients_and_step(reference, spec, config, plan_profile, topology, rank, x)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        handle.__exit__(None, None, None)
        dist.destroy_process_group()
