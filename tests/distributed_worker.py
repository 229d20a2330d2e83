"""Runs inside every spawned gloo rank: GRACE layers against the unmodified transformers model.

Each rank holds the same reference model and the same global batch, serves its own contiguous share
through GRACE layers (all-to-all with the other ranks), and compares with the reference's rows."""
import contextlib
import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


from grace_ds.exchange import CommunicationConfig
from grace_ds.exchange.graphed_gather import GraphedGather
from grace_ds.logical_nodes import join_logical_node
from grace_ds.models import convert_model, find_moe_blocks
from grace_ds.models.grace_experts import GraceExperts
from grace_ds.planners import make_plan
from grace_ds.routing_stats import RoutingStats
from grace_ds.runtime import GraceRuntime
from grace_ds.topology import Topology
import grace_ds.experts as grace_experts
from tests.tiny_models import tiny_model

SEQUENCES_PER_RANK, SEQUENCE_LENGTH = 2, 12
# GRACE_TEST_DEVICE=cuda runs the same checks over NCCL, one GPU a rank (scripts/gpu_exactness.sh).
DEVICE = torch.device(os.environ.get("GRACE_TEST_DEVICE", "cpu"))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def check_family(family: str, rank: int, world: int, topology: Topology, policies, routers, modes) -> dict:
    reference = tiny_model(family).to(DEVICE)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (world * SEQUENCES_PER_RANK, SEQUENCE_LENGTH)).to(DEVICE)
    blocks = find_moe_blocks(reference)
    recorder = RoutingStats(len(blocks), int(blocks[0][1].experts.gate_up_proj.shape[0]),
                            reference.config.num_experts_per_tok).attach_to_routers(blocks)
    with torch.no_grad():
        ref_logits = reference(ids).logits
    recorder.detach()
    profile = recorder.to_profile(reduce=False)  # every rank saw the whole batch already
    mine = slice(rank * SEQUENCES_PER_RANK, (rank + 1) * SEQUENCES_PER_RANK)
    results, node_groups, split_sizes = {}, {}, {}
    for policy in policies:
        plan = make_plan(policy, profile, topology, replica_slots=1)
        for router in routers:
            for mode in modes:
                model = copy.deepcopy(reference)
                runtime = make_runtime(plan, rank, router, mode)
                convert_model(model, runtime)
                exchanges = []
                with torch.no_grad(), counted_split_size_exchanges(exchanges):
                    out = model(ids[mine]).logits
                split_sizes[mode] = len(exchanges) / len(blocks)
                results[f"{policy}/{router}/{mode}"] = relative_error(out, ref_logits[mine])
                if runtime.exchange.node_group is not None:
                    node_groups[mode] = dist.get_process_group_ranks(runtime.exchange.node_group.group)
    # Memory: only this rank's slots are held, no full fused expert tensor survives.
    held = sum(p.numel() for m in model.modules() if isinstance(m, GraceExperts) for p in m.parameters())
    per_expert = blocks[0][1].experts.gate_up_proj[0].numel() + blocks[0][1].experts.down_proj[0].numel()
    slots = sum(int((plan.slot_expert[layer, rank] >= 0).sum()) for layer in range(plan.num_layers))
    grace_params = {id(p) for m in model.modules() if isinstance(m, GraceExperts) for p in m.parameters()}
    fused_left = [n for n, p in model.named_parameters() if p.dim() == 3 and id(p) not in grace_params]
    return {"errors": results, "expert_params_held": held, "expert_params_expected": slots * per_expert,
            "full_expert_params": plan.num_layers * plan.num_experts * per_expert, "fused_left": fused_left,
            "node_groups": node_groups, "split_size_exchanges_per_layer": split_sizes}


@contextlib.contextmanager
def counted_split_size_exchanges(found: list):
    """Appends one entry per all-to-all of split sizes (int64 [ranks, columns], columns other than a pair
    record's 4): the exchanges whose result the host waits for."""
    real = dist.all_to_all_single

    def counting(output, tensor, *args, **kwargs):
        if tensor.dtype == torch.long and tensor.dim() == 2 and tensor.shape[1] != 4:
            found.append(tuple(tensor.shape))
        return real(output, tensor, *args, **kwargs)

    dist.all_to_all_single = counting
    try:
        yield
    finally:
        dist.all_to_all_single = real


def main(rank: int, world: int, nodes: int, port: int, out_dir: str, spec: str) -> None:
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        topology = Topology.uniform(nodes, world // nodes)
        config = json.loads(spec)
        report = {family: check_family(family, rank, world, topology, **config["checks"][family])
                  for family in config.get("families", [])}
        if "deepspeed" in config:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)  # wraps the process group made above
            report["deepspeed"] = check_deepspeed(rank, world, topology, **config["deepspeed"])
            if config.get("checkpoint"):
                report["checkpoint"] = check_checkpoint(rank, world, topology, out_dir)
                report["training_profile"] = check_training_profile(rank, world, topology, out_dir)
            if config.get("init_inference"):
                report["init_inference"] = check_init_inference(rank, world, topology, out_dir)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exchange_modes(topology: Topology) -> list[str]:
    """flat; hierarchical across nodes; gather with more than one rank (across nodes: by node, and ring)."""
    return (["flat"] + ["hierarchical"] * (topology.num_nodes > 1) + ["gather"] * (topology.num_gpus > 1)
            + ["gather-ring"] * (topology.num_nodes > 1))


def make_runtime(plan, rank: int, router: str, mode: str) -> GraceRuntime:
    """mode: a communication mode, gather-ring (the gather exchange over NCCL's ring collectives), or
    <mode>-node-groups (its exchanges inside a node over the node's own process group)."""
    return GraceRuntime(plan, rank=rank, router=router, communication=CommunicationConfig.from_label(mode), device=DEVICE)


class ExpertMLP(torch.nn.Module):
    """A plain expert, as DeepSpeed-MoE users write them."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, inner)
        self.fc2 = torch.nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def check_deepspeed(rank: int, world: int, topology: Topology, policies, ks) -> dict:
    """GraceMoE against deepspeed.moe.layer.MoE (drop_tokens=False, no 2nd-expert sampling), same weights."""
    import deepspeed
    from deepspeed.moe.layer import MoE

    from grace_ds.deepspeed_moe import GraceMoE
    from grace_ds.routing_profile import RoutingProfile

    hidden, inner, num_experts = 16, 24, 8
    torch.manual_seed(3)
    experts = [ExpertMLP(hidden, inner).state_dict() for _ in range(num_experts)]
    gate_weight = torch.randn(num_experts, hidden)
    inputs = torch.randn(world, 2, 10, hidden).to(DEVICE)  # every rank's batch, so profiles agree everywhere
    results = {}
    for k in ks:
        reference = MoE(hidden, ExpertMLP(hidden, inner), num_experts, ep_size=world, k=k, drop_tokens=False,
                        top2_2nd_expert_sampling=False).to(DEVICE).eval()
        reference.set_deepspeed_parallelism()
        per_rank = num_experts // world
        with torch.no_grad():
            reference.deepspeed_moe.gate.wg.weight.copy_(gate_weight)
            for local, module in enumerate(reference.deepspeed_moe.experts.deepspeed_experts):
                module.load_state_dict(experts[rank * per_rank + local])
            expected = reference(inputs[rank])[0]
        topk_ids = torch.topk(inputs.reshape(-1, hidden).cpu() @ gate_weight.T, k, dim=-1).indices
        profile = RoutingProfile.from_topk_ids(topk_ids.view(-1, 1, k), num_experts)
        for policy in policies:
            for mode in exchange_modes(topology):
                plan = make_plan(policy, profile, topology, replica_slots=1)
                runtime = make_runtime(plan, rank, "tar", mode)
                layer = GraceMoE(hidden, ExpertMLP(hidden, inner), num_experts, runtime, layer=0, k=k).to(DEVICE).eval()
                layer.set_deepspeed_parallelism()
                with torch.no_grad():
                    layer.deepspeed_moe.gate.wg.weight.copy_(gate_weight)
                    layer.deepspeed_moe.load_logical_experts(experts)
                    out, l_aux, counts = layer(inputs[rank])
                results[f"k{k}/{policy}/{mode}"] = relative_error(out, expected)
    deepspeed.comm.barrier()
    return {"errors": results}


def check_generation(engine, reference: torch.nn.Module, rank: int, world: int) -> dict:
    """transformers' generate on every rank at once, each with its own prompts and stopping point: rank r
    generates up to 2 + 3r tokens and stops at an EOS that one of its sequences meets early; the last rank
    (of several) has no prompt. Each rank's result must be the unmodified model's on its own prompts."""
    prompts = torch.randint(3, 128, (2, 5 + rank), generator=torch.Generator().manual_seed(70 + rank)).to(DEVICE)
    if world > 1 and rank == world - 1:
        prompts = prompts[:0]
    settings = dict(do_sample=False, pad_token_id=2, max_new_tokens=2 + 3 * rank)
    eos = None
    if prompts.shape[0]:
        with torch.no_grad():
            free = reference.generate(prompts, eos_token_id=None, **settings)
        eos = int(free[0, prompts.shape[1] + 1])  # the first sequence's second new token
    with torch.no_grad():
        want = reference.generate(prompts, eos_token_id=eos, **settings) if prompts.shape[0] else prompts
        got = engine.module.generate(prompts, eos_token_id=eos, **settings)
    return {"equal": torch.equal(got, want), "shape": list(got.shape)}


def check_init_inference(rank: int, world: int, topology: Topology, out_dir: str) -> dict:
    """grace_ds.init_inference with a DeepSpeed config dict holding the grace_moe section."""
    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.errors import GraceInputError

    reference = tiny_model("olmoe").to(DEVICE)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (world * SEQUENCES_PER_RANK, SEQUENCE_LENGTH)).to(DEVICE)
    blocks = find_moe_blocks(reference)
    recorder = RoutingStats(len(blocks), 8, 2).attach_to_routers(blocks)
    with torch.no_grad():
        ref_logits = reference(ids).logits
    recorder.detach()
    plan_path = Path(out_dir, "plan.json")
    if rank == 0:
        make_plan("grace", recorder.to_profile(reduce=False), topology, 1).save(plan_path)
    dist.barrier()
    config = {"dtype": torch.float32, "replace_with_kernel_inject": False,
              "grace_moe": {"plan": str(plan_path), "profiling": True, "communication": {"node_groups": True}}}
    engine = grace_deepspeed.init_inference(copy.deepcopy(reference), config)
    mine = slice(rank * SEQUENCES_PER_RANK, (rank + 1) * SEQUENCES_PER_RANK)
    with torch.no_grad():
        out = engine(ids[mine]).logits
    profile_path = grace_deepspeed.save_profile(engine, Path(out_dir, "served.safetensors"))
    # From the checkpoint directory: each rank reads the dense weights and its slots' experts only.
    checkpoint = Path(out_dir, "olmoe-checkpoint")
    if rank == 0:
        reference.save_pretrained(checkpoint)
    dist.barrier()
    from_directory = grace_deepspeed.init_inference(str(checkpoint), {**config, "grace_moe": {
        "plan": str(plan_path), "fault_timeout_s": 60}})  # a rank left behind stops the job in a minute
    with torch.no_grad():
        directory_error = relative_error(from_directory(ids[mine]).logits, ref_logits[mine])
    generated = check_generation(from_directory, reference, rank, world)
    converted = engine.module.state_dict()
    read = from_directory.grace_load
    directory = {"error": directory_error, "read_bytes": read.read_bytes, "expert_bytes": read.expert_bytes,
                 "skipped_expert_bytes": read.skipped_expert_bytes,
                 "weights_apart": max(float((converted[k].float() - v.float()).abs().max())
                                      for k, v in from_directory.module.state_dict().items() if v.numel()),
                 "same_names": sorted(converted) == sorted(from_directory.module.state_dict()),
                 "generated": generated}
    # `auto` by batch size: with thresholds of 20 (hierarchical) and 4 (gather) tokens, full batches (24 a
    # rank) go hierarchical, short ones (8) flat, uneven ones (rank 0 full, the others 4) follow the largest
    # rank; the shortest (4 a rank, and 2 on rank 0 with 4 elsewhere: padded) take the gather exchange.
    runtime = engine.grace_runtime
    exchange = runtime.exchange
    exchange.choice.hierarchical_min_tokens = 20 if runtime.comm_mode == "hierarchical" else 0
    exchange.choice.gather_max_tokens = 4 if world > 1 else 0

    def graphs(capture: bool) -> GraphedGather:
        return GraphedGather(runtime.served, exchange.exchanges["gather"], capture, 8)

    if exchange.graphs is None:  # CPU: the graphs' padded body, run eagerly (on CUDA: captured, replayed)
        exchange.graphs = graphs(False)
    by_size = []
    for length in ([SEQUENCE_LENGTH] * world, [4] * world, [SEQUENCE_LENGTH] + [2] * (world - 1), [2] * world,
                   [1] + [2] * (world - 1)):
        before = dict(exchange.choice.mode_calls)
        with torch.no_grad():
            got = engine(ids[mine, :length[rank]]).logits
            want = reference(ids[:, :length[rank]]).logits[mine]
        by_size.append({"error": relative_error(got, want),
                        "modes": {m: exchange.choice.mode_calls[m] - before[m] for m in before}})
    graph_check = None
    if DEVICE.type == "cuda" and world > 1:
        # bf16 on the GPU: gather calls replay CUDA graphs, whose outputs equal the eager gather path's.
        engine.module.to(torch.bfloat16)
        exchange.graphs = None
        # Graph capture keeps the gather way back; eager takes it too, however low the sparse threshold is set.
        lowered, grace_experts.SPARSE_SUM_MIN_PAIRS = grace_experts.SPARSE_SUM_MIN_PAIRS, 2**62
        try:
            with torch.no_grad():
                eager = engine(ids[mine, :2]).logits.float()
        finally:
            grace_experts.SPARSE_SUM_MIN_PAIRS = lowered
        exchange.graphs = graphs(True)
        with torch.no_grad():
            replayed = [engine(ids[mine, :2]).logits.float() for _ in range(2)]
        graph_check = {"replays": exchange.graphs.replays,
                       "error": max(relative_error(r, eager) for r in replayed)}
        exchange.graphs = graphs(False)  # for the counts reported below
    # Planned at start-up from a profile: the first rank plans, every rank serves its plan.
    startup = Path(out_dir, "startup_profile.safetensors")
    if rank == 0:
        recorder.to_profile(reduce=False).save(startup)
    dist.barrier()
    planned = grace_deepspeed.init_inference(copy.deepcopy(reference), {"dtype": torch.float32,
                                                                        "grace_moe": {"profile": str(startup)}})
    with torch.no_grad():
        from_profile = relative_error(planned(ids[mine]).logits, ref_logits[mine])
    # A plan for another job shape is refused with one clear message.
    wrong = Path(out_dir, "wrong.json")
    if rank == 0:
        make_plan("grace", recorder.to_profile(reduce=False), Topology.uniform(1, 1), 1).save(wrong)
    dist.barrier()
    try:
        grace_deepspeed.init_inference(copy.deepcopy(reference), {"dtype": torch.float32, "grace_moe": {"plan": str(wrong)}})
        refused = ""
    except GraceInputError as error:
        refused = str(error)
    return {"error": relative_error(out, ref_logits[mine]), "error_planned_at_startup": from_profile,
            "from_directory": directory,
            "by_size": by_size, "base_mode": runtime.comm_mode, "padded_gather_calls": exchange.graphs.calls,
            "graph_check": graph_check,
            "node_group": exchange.node_group and dist.get_process_group_ranks(exchange.node_group.group),
            "topology": list(engine.grace_runtime.plan.topology.gpus_per_node),
            "profile": str(profile_path), "refused": refused}


class TinyGraceNet(torch.nn.Module):
    def __init__(self, runtime: GraceRuntime, hidden: int = 16, inner: int = 24, seed: int = 0) -> None:
        from grace_ds.deepspeed_moe import GraceMoE

        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(hidden, hidden)
        self.moe = GraceMoE(hidden, ExpertMLP(hidden, inner), 8, runtime, layer=0, k=2)
        self.moe.deepspeed_moe.load_logical_experts([ExpertMLP(hidden, inner).state_dict() for _ in range(8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.inp(x))[0]


def check_checkpoint(rank: int, world: int, topology: Topology, out_dir: str) -> dict:
    """A DeepSpeed engine with GraceMoE saves and loads; loading restores identical outputs."""
    import deepspeed

    from grace_ds.routing_profile import RoutingProfile

    torch.manual_seed(5)
    profile = RoutingProfile.from_topk_ids(torch.stack([torch.randperm(8)[:2] for _ in range(200)]).view(200, 1, 2), 8)
    plan = make_plan("grace", profile, topology, replica_slots=1)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(rank)).to(DEVICE)
    outputs = []
    for seed in (0, 1):  # the second model starts from other weights, then loads the first one's checkpoint
        model = TinyGraceNet(GraceRuntime(plan, rank=rank, communication="auto", device=DEVICE), seed=seed).to(DEVICE)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          config=config)
        if seed == 1:
            before = engine(x).detach()
            engine.load_checkpoint(str(Path(out_dir, "ckpt")), tag="t")
        engine.eval()
        with torch.no_grad():
            outputs.append(engine(x))
        if seed == 0:
            engine.save_checkpoint(str(Path(out_dir, "ckpt")), tag="t")
            from grace_ds.deepspeed_monitoring import attach_recorder

            recorder = attach_recorder(model)  # GraceMoE layers report through their runtime
            with torch.no_grad():
                engine(x)
            profiled_tokens = recorder.to_profile().num_tokens.tolist()
    return {"restored": float((outputs[0] - outputs[1]).abs().max()),
            "differed_before": float((outputs[0] - before).abs().max()),
            "profiled_tokens": profiled_tokens, "expected_tokens": [x.shape[0] * x.shape[1] * world]}


def check_training_profile(rank: int, world: int, topology: Topology, out_dir: str) -> dict:
    """grace_ds.deepspeed.initialize with profiling on: a few training steps of a DeepSpeed-MoE model,
    then the profile reduced over all ranks."""
    from deepspeed.moe.layer import MoE

    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.routing_profile import RoutingProfile

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = MoE(16, ExpertMLP(16, 24), 8, ep_size=world, k=2, drop_tokens=False,
                           top2_2nd_expert_sampling=False)

        def forward(self, x):
            out, l_aux, _ = self.moe(x)
            return out.pow(2).mean() + 0.01 * l_aux

    torch.manual_seed(0)
    model = Net().to(DEVICE)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
              "grace_moe": {"profiling": True, "profile_out": str(Path(out_dir, "trained.safetensors"))}}
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    engine, *_ = grace_deepspeed.initialize(model, config, optimizer=torch.optim.SGD(groups, lr=0.01))
    steps, tokens_per_step = 3, 4 * 10
    for step in range(steps):
        loss = engine(torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(rank * 10 + step)).to(DEVICE))
        engine.backward(loss)
        engine.step()
    path = grace_deepspeed.save_profile(engine)
    dist.barrier()
    profile = RoutingProfile.load(path)
    return {"tokens": profile.num_tokens.tolist(), "expected_tokens": steps * tokens_per_step * world,
            "pairs": profile.expert_load.sum().item(), "top_k": profile.top_k}
