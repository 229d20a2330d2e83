"""Runs inside every spawned gloo rank: training through GRACE layers against DeepSpeed's own MoE.

Both models hold the same weights and see the same data; every rank compares its gradients (input,
upstream layer, gate, every logical expert) and, through DeepSpeed engines, the parameters after
optimizer steps with gradient clipping on, and checks that the copies of a replicated expert stay equal.
"""
import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


from grace_ds.logical_nodes import join_logical_node
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.runtime import GraceRuntime
from grace_ds.topology import Topology

HIDDEN, INNER, EXPERTS = 16, 24, 8
DEVICE = torch.device(os.environ.get("GRACE_TEST_DEVICE", "cpu"))


class ExpertMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(HIDDEN, INNER)
        self.fc2 = torch.nn.Linear(INNER, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Net(torch.nn.Module):
    """An upstream linear layer (stands for attention), then the MoE layer."""

    def __init__(self, moe: torch.nn.Module, aux: float) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(HIDDEN, HIDDEN)
        self.moe = moe
        self.aux = aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, l_aux, _ = self.moe(self.inp(x))
        return out.pow(2).mean() + self.aux * l_aux


def routing_profile(gate_weight: torch.Tensor, inputs: torch.Tensor, k: int) -> RoutingProfile:
    """The gate's picks on every rank's batch: what the planners group and replicate."""
    topk_ids = torch.topk(inputs.reshape(-1, HIDDEN).cpu() @ gate_weight.T, k, dim=-1).indices
    return RoutingProfile.from_topk_ids(topk_ids.view(-1, 1, k), EXPERTS)


def logical_expert_tensors(model: torch.nn.Module, grads: bool, value=None) -> torch.Tensor:
    """[E, values] every logical expert's flattened parameters (or gradients, or `value(param)`), the same
    on every rank: DeepSpeed's layer holds experts rank * E/ep + i; GraceMoE's primaries hold theirs
    (replicas left out, their gradients being zero by design)."""
    from grace_ds.deepspeed_moe import GraceMoE

    moe = model.moe
    width = sum(p.numel() for p in ExpertMLP().parameters())
    out = torch.zeros(EXPERTS, width, dtype=torch.float64, device=DEVICE)

    value = value or (lambda p: p.grad if grads else p)

    def flat(module):
        return torch.cat([value(p).detach().reshape(-1).double() for p in module.parameters()])

    experts = moe.deepspeed_moe.experts.deepspeed_experts
    if isinstance(moe, GraceMoE):
        runtime, layer = moe.deepspeed_moe._runtime, moe.deepspeed_moe.layer
        primary = runtime.plan.slot_is_primary[layer, runtime.rank]
        for slot, expert in enumerate(moe.deepspeed_moe.held):
            if expert >= 0 and bool(primary[slot]):
                out[expert] = flat(experts[str(slot)])
        group = runtime.group
    else:
        ep_rank = dist.get_rank(moe.deepspeed_moe.ep_group)
        for local, module in enumerate(experts):
            out[ep_rank * moe.num_local_experts + local] = flat(module)
        group = moe.deepspeed_moe.ep_group
    dist.all_reduce(out, group=group)
    return out


def replica_gradients(model: torch.nn.Module) -> float:
    """Largest gradient entry held by a replica (non-primary copy) on this rank."""
    layer = model.moe.deepspeed_moe
    primary = layer._runtime.plan.slot_is_primary[layer.layer, layer._runtime.rank]
    worst = 0.0
    for slot, expert in enumerate(layer.held):
        if expert >= 0 and not bool(primary[slot]):
            for param in layer.experts.deepspeed_experts[str(slot)].parameters():
                worst = max(worst, float(param.grad.abs().max()))
    return worst


def build_pair(k: int, plan, aux: float, mode: str, ep_size: int, seed: int = 3, set_groups: bool = True, **gate):
    """(DeepSpeed MoE net, GraceMoE net) with the same weights. set_groups: make the expert-parallel
    groups now (deepspeed.initialize does it otherwise)."""
    from deepspeed.moe.layer import MoE

    from grace_ds.deepspeed_moe import GraceMoE

    torch.manual_seed(seed)
    experts = [ExpertMLP().state_dict() for _ in range(EXPERTS)]
    gate_weight = torch.randn(EXPERTS, HIDDEN)
    inp = torch.nn.Linear(HIDDEN, HIDDEN).state_dict()
    reference = Net(MoE(HIDDEN, ExpertMLP(), EXPERTS, ep_size=ep_size, k=k, drop_tokens=False,
                        top2_2nd_expert_sampling=False, **gate), aux).to(DEVICE)
    ep_rank = dist.get_rank() % ep_size
    per_rank = EXPERTS // ep_size
    runtime = GraceRuntime(plan, communication=mode, device=DEVICE)
    grace = Net(GraceMoE(HIDDEN, ExpertMLP(), EXPERTS, runtime, 0, k=k, ep_size=ep_size, **gate), aux).to(DEVICE)
    if set_groups:
        reference.moe.set_deepspeed_parallelism()
        grace.moe.set_deepspeed_parallelism()
    with torch.no_grad():
        for net in (reference, grace):
            net.inp.load_state_dict(inp)
            net.moe.deepspeed_moe.gate.wg.weight.copy_(gate_weight)
        for local, module in enumerate(reference.moe.deepspeed_moe.experts.deepspeed_experts):
            module.load_state_dict(experts[ep_rank * per_rank + local])
        grace.moe.deepspeed_moe.load_logical_experts(experts)
    return reference, grace, gate_weight


def batch(rank: int, step: int = 0) -> torch.Tensor:
    return torch.randn(2, 10, HIDDEN, generator=torch.Generator().manual_seed(1000 * step + rank)).to(DEVICE)


def every_batch(world: int) -> torch.Tensor:
    return torch.stack([batch(r) for r in range(world)])


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def check_gradients(rank: int, world: int, topology: Topology) -> dict:
    """One backward of GraceMoE against DeepSpeed's MoE: input, upstream, gate and expert gradients."""
    results, replicated = {}, {}
    modes = ["flat"] + ["hierarchical"] * (topology.num_nodes > 1)
    for k in (1, 2, 3):
        for policy in ("grace", "contiguous"):
            for mode in modes:
                for aux in (0.0, 0.1):
                    torch.manual_seed(3)
                    gate_weight = torch.randn(EXPERTS, HIDDEN)
                    plan = make_plan(policy, routing_profile(gate_weight, every_batch(world), k), topology,
                                     replica_slots=1)
                    reference, grace, _ = build_pair(k, plan, aux, mode, world)
                    grads = []
                    for net in (reference, grace):
                        x = batch(rank).requires_grad_(True)
                        net(x).backward()
                        grads.append({"input": x.grad, "upstream": net.inp.weight.grad,
                                      "gate": net.moe.deepspeed_moe.gate.wg.weight.grad,
                                      "experts": logical_expert_tensors(net, grads=True)})
                    key = f"k{k}/{policy}/{mode}/aux{aux}"
                    results[key] = {name: (max_difference(grads[0][name], grads[1][name]) if grads[1][name] is not None
                                           else None) for name in grads[0]}
                    results[key]["gate_norm"] = float(grads[0]["gate"].abs().max())
                    results[key]["replica_gradient"] = replica_gradients(grace)
                    replicated[key] = int((plan.copies_per_expert() > 1).sum())
    return {"differences": results, "replicated_experts": replicated}


def parameters_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {"upstream": net.inp.weight.detach().clone(), "gate": net.moe.deepspeed_moe.gate.wg.weight.detach().clone(),
            "experts": logical_expert_tensors(net, grads=False)}


def train(net: torch.nn.Module, grace: bool, stage: int, steps: int, rank: int, dtype: str = "fp32",
          clip: float = 1e-3, checkpoint: str | None = None, adam: bool = False, zero: dict | None = None,
          extra: dict | None = None) -> dict:
    """`steps` DeepSpeed steps (SGD with momentum and weight decay, or AdamW; gradient clipping on):
    parameters after the first and the last, and (GRACE) how far apart the copies of an expert were
    after each step."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import grace_ds.deepspeed as grace_deepspeed

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(net.parameters()), "name": "p"})
    optimizer = (torch.optim.AdamW(groups, lr=0.01, weight_decay=0.01) if adam
                 else torch.optim.SGD(groups, lr=0.5, momentum=0.9, weight_decay=0.01))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": clip, "zero_optimization": {"stage": stage, **(zero or {})},
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": dtype == "bf16"}, **(extra or {})}
    if grace:
        engine, *_ = grace_deepspeed.initialize(net, config, optimizer=optimizer)
    else:
        engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    snapshots, apart, norms = {}, [], []
    for step in range(steps):
        loss = engine(batch(rank, step + 1).to(torch.bfloat16 if dtype == "bf16" else torch.float32))
        engine.backward(loss)
        engine.step()
        norms.append(engine.get_global_grad_norm())  # what clipping divided by
        if grace:
            apart.append(engine.max_replica_difference())
        if step + 1 in (1, steps):
            snapshots[step + 1] = parameters_of(net)
    if checkpoint is not None:
        engine.save_checkpoint(checkpoint, tag="t")
    return {"parameters": snapshots, "replicas_apart": apart, "engine": engine, "norms": norms}


def compare(a: dict, b: dict) -> dict:
    return {step: {name: max_difference(a[step][name], b[step][name]) for name in a[step]} for step in a}


def check_training(rank: int, world: int, topology: Topology, out_dir: str) -> dict:
    """10 steps of GraceMoE (replicas, flat and hierarchical, ZeRO 0-2) against DeepSpeed's MoE under ZeRO 1
    (whose clipping uses the exact global norm), then a checkpoint round trip."""
    k, steps = 2, 10
    torch.manual_seed(3)
    gate_weight = torch.randn(EXPERTS, HIDDEN)
    plan = make_plan("grace", routing_profile(gate_weight, every_batch(world), k), topology, replica_slots=1)
    reference, _, _ = build_pair(k, plan, 0.01, "flat", world, set_groups=False)
    expected_run = train(reference, False, 1, steps, rank)
    expected, expected_norms = expected_run["parameters"], expected_run["norms"]
    results = {}
    modes = ["flat"] + ["hierarchical"] * (topology.num_nodes > 1)
    for mode in modes:
        for stage in (0, 1, 2):
            _, grace, _ = build_pair(k, plan, 0.01, mode, world, set_groups=False)
            checkpoint = str(Path(out_dir, f"ckpt-{mode}-{stage}"))
            run = train(grace, True, stage, steps, rank, checkpoint=checkpoint)
            entry = {"differences": compare(run["parameters"], expected), "replicas_apart": max(run["replicas_apart"]),
                     # a replica keeping its gradient would count its expert twice in the norm clipping uses
                     "norm_relative_differences": [abs(float(a) - float(b)) / float(b)
                                                   for a, b in zip(run["norms"], expected_norms)]}
            # A fresh model from other weights loads the checkpoint: the same parameters, copies equal.
            _, fresh, _ = build_pair(k, plan, 0.01, mode, world, seed=11, set_groups=False)
            restored = train(fresh, True, stage, 0, rank)["engine"]
            restored.load_checkpoint(checkpoint, tag="t")
            entry["restored"] = {name: max_difference(value, run["parameters"][steps][name])
                                 for name, value in parameters_of(fresh).items()}
            entry["restored_replicas_apart"] = restored.max_replica_difference()
            results[f"{mode}/zero{stage}"] = entry
    return results


def check_accumulation(rank: int, world: int, topology: Topology) -> dict:
    """gradient_accumulation_steps 2: 6 micro steps (3 optimizer steps, clipping on) of GraceMoE (replicas,
    hierarchical, ZeRO 0-2) against DeepSpeed's MoE under ZeRO 1 with the same accumulation."""
    k, micro_steps, accumulation = 2, 6, {"gradient_accumulation_steps": 2}
    torch.manual_seed(3)
    plan = make_plan("grace", routing_profile(torch.randn(EXPERTS, HIDDEN), every_batch(world), k), topology,
                     replica_slots=1)
    reference, _, _ = build_pair(k, plan, 0.01, "flat", world, set_groups=False)
    expected = train(reference, False, 1, micro_steps, rank, extra=accumulation)["parameters"]
    # Micro step 1 updates nothing (its snapshot is the start): how far 3 optimizer steps moved the weights.
    out = {"moved": {name: max_difference(expected[micro_steps][name], expected[1][name]) for name in expected[1]}}
    for stage in (0, 1, 2):
        _, grace, _ = build_pair(k, plan, 0.01, "hierarchical", world, set_groups=False)
        run = train(grace, True, stage, micro_steps, rank, extra=accumulation)
        out[f"zero{stage}"] = {"differences": compare(run["parameters"], expected),
                               "replicas_apart": max(run["replicas_apart"]), "steps": run["engine"].global_steps}
    return out


def check_monitor(rank: int, world: int, topology: Topology, out_dir: str) -> dict:
    """GraceMoE (GRACE plan with replicas, hierarchical) trained 4 steps with DeepSpeed's csv_monitor on and
    grace_moe.monitor_interval_steps 2: what the monitor wrote at steps 2 and 4, against the bytes the forwards
    of steps 3-4 handed to torch.distributed.all_to_all_single (counted at the call, as the training
    benchmark counts)."""
    from grace_ds.bench.training_variants import WireBytes

    k = 2
    torch.manual_seed(3)
    plan = make_plan("grace", routing_profile(torch.randn(EXPERTS, HIDDEN), every_batch(world), k), topology,
                     replica_slots=1)
    _, grace, _ = build_pair(k, plan, 0.01, "hierarchical", world, set_groups=False)
    folder = str(Path(out_dir, "monitor"))
    extra = {"csv_monitor": {"enabled": True, "output_path": folder, "job_name": "run"},
             "grace_moe": {"monitor_interval_steps": 2}}
    engine = train(grace, True, 1, 0, rank, extra=extra)["engine"]
    wire, forward_bytes = WireBytes(topology.node_of_gpu.tolist()), torch.zeros(2, dtype=torch.float64)
    wire.install()
    try:
        for number in range(1, 5):
            wire.reset()
            loss = engine(batch(rank, number))
            if number >= 3:  # the forwards of the monitor's second interval
                forward_bytes += torch.tensor([wire.exchange.cross_node_bytes, wire.exchange.intra_node_bytes])
            engine.backward(loss)
            engine.step()
    finally:
        wire.uninstall()
    moved = forward_bytes
    dist.all_reduce(moved)
    written = {}
    for path in Path(folder, "run").glob("*grace_moe*.csv"):
        written[path.stem] = [line.split(",") for line in path.read_text().splitlines()[1:]]
    return {"last": engine.grace_monitor.last, "written": written,
            "wire_MB_per_step": (moved / world / 2 / 1e6).tolist(), "tokens": int(batch(rank).shape[0] * batch(rank).shape[1])}


def check_expert_data_parallel(rank: int, world: int, out_dir: str) -> dict:
    """ep_size 2 on 4 ranks (two expert-parallel groups, data parallel across them): each group serves a
    plan for its 2 GPUs; gradients after one backward, parameters after 10 ZeRO-1 steps, against
    DeepSpeed's MoE with ep_size 2. A runtime given the job's rank instead stops every rank with one error."""
    from grace_ds.errors import GraceInputError

    k, steps, ep_size = 2, 10, 2
    torch.manual_seed(3)
    gate_weight = torch.randn(EXPERTS, HIDDEN)
    plan = make_plan("grace", routing_profile(gate_weight, every_batch(world), k), Topology.uniform(1, ep_size),
                     replica_slots=1)
    reference, grace, _ = build_pair(k, plan, 0.01, "flat", ep_size)
    grads = []
    for net in (reference, grace):
        x = batch(rank).requires_grad_(True)
        net(x).backward()
        grads.append({"input": x.grad, "upstream": net.inp.weight.grad, "gate": net.moe.deepspeed_moe.gate.wg.weight.grad,
                      "experts": logical_expert_tensors(net, grads=True)})
    gradients = {name: max_difference(grads[0][name], grads[1][name]) for name in grads[0]}
    reference, _, _ = build_pair(k, plan, 0.01, "flat", ep_size, set_groups=False)
    _, grace, _ = build_pair(k, plan, 0.01, "flat", ep_size, set_groups=False)
    expected_run = train(reference, False, 1, steps, rank)
    expected, expected_norms = expected_run["parameters"], expected_run["norms"]
    run = train(grace, True, 1, steps, rank)
    try:
        GraceRuntime(plan, rank=rank, communication="flat", device=DEVICE)
        refused = ""
    except GraceInputError as error:
        refused = str(error)
    return {"gradients": gradients, "parameters": compare(run["parameters"], expected),
            "replicas_apart": max(run["replicas_apart"]), "runtime_rank": grace.moe.deepspeed_moe._runtime.rank,
            "ep_group": dist.get_process_group_ranks(grace.moe.deepspeed_moe._runtime.group), "refused": refused}


def check_bf16(rank: int, world: int, topology: Topology) -> dict:
    """bf16 (DeepSpeed's bf16 optimizer, ZeRO 0 and 1): 10 steps against DeepSpeed's MoE in bf16."""
    k, steps = 2, 10
    torch.manual_seed(3)
    gate_weight = torch.randn(EXPERTS, HIDDEN)
    plan = make_plan("grace", routing_profile(gate_weight, every_batch(world), k), topology, replica_slots=1)
    results = {}
    for stage in (0, 1):
        reference, _, _ = build_pair(k, plan, 0.01, "flat", world, set_groups=False)
        _, grace, _ = build_pair(k, plan, 0.01, "flat", world, set_groups=False)
        expected = train(reference.to(torch.bfloat16), False, stage, steps, rank, "bf16", clip=1e-2)["parameters"]
        run = train(grace.to(torch.bfloat16), True, stage, steps, rank, "bf16", clip=1e-2)
        scale = max(float(v.abs().max()) for v in expected[steps].values())
        results[f"zero{stage}"] = {"differences": compare(run["parameters"], expected), "scale": scale,
                                   "replicas_apart": max(run["replicas_apart"])}
    return results


def check_arguments(rank: int, world: int, topology: Topology) -> dict:
    """DeepSpeed MoE's constructor arguments on GraceMoE: honoured ones give DeepSpeed's outputs and
    gradients (residual MoE, capacity drops, noisy gates), refused ones name themselves."""
    from grace_ds.deepspeed_moe import GraceMoE
    from grace_ds.errors import GraceInputError

    torch.manual_seed(3)
    gate_weight = torch.randn(EXPERTS, HIDDEN)
    results = {}
    cases = {"residual": dict(k=2, use_residual=True), "drops_k1": dict(k=1, drop_tokens=True, capacity_factor=0.5,
                                                                         min_capacity=1, use_rts=False),
             "drops_k2": dict(k=2, drop_tokens=True, capacity_factor=0.5, min_capacity=1),
             "rsample_k1": dict(k=1, noisy_gate_policy="RSample"), "jitter_k2": dict(k=2, noisy_gate_policy="Jitter")}
    for name, case in cases.items():
        k = case.pop("k")
        plan = make_plan("grace", routing_profile(gate_weight, every_batch(world), k), topology, replica_slots=1)
        drop = case.pop("drop_tokens", False)
        reference, grace, _ = build_pair(k, plan, 0.01, "flat", world, **case)
        if drop:  # the pair is built dropless; both gates then drop by the same capacity rule
            reference.moe.deepspeed_moe.gate.drop_tokens = grace.moe.deepspeed_moe.gate.drop_tokens = True
        if case.get("use_residual"):
            with torch.no_grad():
                grace.moe.mlp.load_state_dict(reference.moe.mlp.state_dict())
                grace.moe.coefficient.load_state_dict(reference.moe.coefficient.state_dict())
        outs, grads = [], []
        for net in (reference, grace):
            torch.manual_seed(77)  # the noisy gates draw the same noise
            x = batch(rank).requires_grad_(True)
            loss = net(x)
            loss.backward()
            outs.append(loss.detach())
            grads.append([x.grad, net.inp.weight.grad, net.moe.deepspeed_moe.gate.wg.weight.grad])
        tokens = grace.inp(batch(rank)).reshape(-1, HIDDEN)
        routes = grace.moe.deepspeed_moe.gate(tokens, None, True, False)[3]
        results[name] = {"loss": max_difference(*outs), "gradients": max(max_difference(a, b) for a, b in zip(*grads)),
                         "dropped_routes": int((routes < 0).sum())}
    refused = {}
    runtime = GraceRuntime(make_plan("grace", routing_profile(gate_weight, every_batch(world), 2), topology, 1),
                           communication="flat", device=DEVICE)
    for argument in ({"use_tutel": True}, {"enable_expert_tensor_parallelism": True}, {"ep_size": 2},
                     {"noisy_gate_policy": "Loud"}):
        try:
            GraceMoE(HIDDEN, ExpertMLP(), EXPERTS, runtime, 0, k=2, **argument)
            refused[next(iter(argument))] = ""
        except GraceInputError as error:
            refused[next(iter(argument))] = str(error)
    results["refused"] = refused
    return results


def main(rank: int, world: int, nodes: int, port: int, out_dir: str, spec: str) -> None:
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        topology = Topology.uniform(nodes, world // nodes)
        checks = json.loads(spec)
        report = {}
        if "gradients" in checks:
            report["gradients"] = check_gradients(rank, world, topology)
        if "training" in checks:
            report["training"] = check_training(rank, world, topology, out_dir)
        if "expert_data_parallel" in checks:
            report["expert_data_parallel"] = check_expert_data_parallel(rank, world, out_dir)
        if "bf16" in checks:
            report["bf16"] = check_bf16(rank, world, topology)
        if "accumulation" in checks:
            report["accumulation"] = check_accumulation(rank, world, topology)
        if "monitor" in checks:
            report["monitor"] = check_monitor(rank, world, topology, out_dir)
        if "hf" in checks:
            from tests.training_hf_worker import check_hf_training  # here: it imports this module

            report["hf"] = check_hf_training(rank, world, topology, out_dir, checks["hf"])
        if "arguments" in checks:
            report["arguments"] = check_arguments(rank, world, topology)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()
