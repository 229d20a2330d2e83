"""Training benchmark: the embedded OLMoE-architecture model trained through GRACE layers against DeepSpeed.

Every variant starts from the same weights and sees the same batches (byte sequences of the standard
library's training part); the GRACE plan is made from a profile of the model's routing on the held-out part.

  deepspeed-moe       each MoE block as deepspeed.moe.layer.MoE (DeepSpeed's contiguous experts, E/W a rank,
                      capacity padding with drop_tokens=False, its top-k gate)
  grace-contiguous    the same blocks as grace_ds.deepspeed_moe.GraceMoE with the contiguous plan (flat exchange)
  grace               GraceMoE with the GRACE plan: grouped, replicated experts, the hierarchical exchange
  transformers        the unmodified transformers model, data parallel (every rank holds every expert)
  transformers-grace  the same model converted by grace_ds.deepspeed.initialize (GRACE plan, hierarchical)
  <reference>/noise   the reference with every weight moved by about one float32 rounding: how far two runs
                      part from rounding alone (top-k choices between near-tied experts flip)

The first three share DeepSpeed's gate (top-k weights renormalised, its l_aux); the last two the model's own
router. Each pair should train alike: the report gives the largest loss difference over the run.

Measured per variant: median step time (forward, backward, optimizer step), bytes a rank sends per step through
torch.distributed's all_to_all_single (split into same-node and cross-node by the logical nodes) and all_reduce
(gradients; GRACE also sums replica gradients), and per-GPU expert load: (token, expert) pairs computed per step,
max/mean over GPUs. On a CPU the ranks emulate GPUs on shared cores: times compare variants on this machine,
not GPUs; bytes and loads are what a GPU run would move and compute.

    python scripts/bench_training.py --out docs/bench-training-2x2-cpu [--steps 200] [--nodes 2 --gpus-per-node 2]
Writes OUT/bench_training.json (with the commit, command and machine) and OUT/loss_curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grace_ds.dispatch import Traffic
from grace_ds.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "grace_ds" / "default_model"
VARIANTS = ("deepspeed-moe", "deepspeed-moe/noise", "grace-contiguous", "grace", "transformers", "transformers/noise",
            "transformers-grace")
# Which variant each one must train like.
REFERENCE = {"deepspeed-moe/noise": "deepspeed-moe", "grace-contiguous": "deepspeed-moe", "grace": "deepspeed-moe",
             "transformers/noise": "transformers", "transformers-grace": "transformers"}
# A top-k choice between near-tied experts flips under any rounding difference, and the runs part from there:
# the /noise controls are the reference with every weight moved by about one float32 rounding (relative 2^-24),
# the yardstick for "equal within floating-point noise".
NOISE = 2.0 ** -24


class WireBytes:
    """Counts what this rank hands to torch.distributed's all_to_all_single and all_reduce (DeepSpeed and
    grace_ds both call them through the module attribute); all_to_all bytes split by the peer's logical
    node as the runtime's own Traffic counts them."""

    def __init__(self, node_of_gpu: list[int]) -> None:
        self.node_of_gpu = node_of_gpu
        self.exchange, self.all_reduce = Traffic(), 0
        self._originals = (dist.all_to_all_single, dist.all_reduce)

    def install(self) -> None:
        all_to_all_single, all_reduce = self._originals

        def counted_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                               async_op=False):
            self._count_all_to_all(input, input_split_sizes, group)
            return all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                     async_op=async_op)

        def counted_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if dist.get_world_size(group) > 1:  # a group of one moves nothing
                self.all_reduce += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_to_all_single, dist.all_reduce = counted_all_to_all, counted_all_reduce

    def _count_all_to_all(self, input: torch.Tensor, splits, group) -> None:
        peers = dist.get_world_size(group)
        row_bytes = input[0].numel() * input.element_size() if input.dim() > 1 else input.element_size()
        if splits is None:  # even splits: the first dimension in equal parts
            splits = [(input.shape[0] if input.dim() else input.numel()) // peers] * peers
        bytes_to = [0] * dist.get_world_size()
        for peer, rows in enumerate(splits):
            bytes_to[dist.get_global_rank(group, peer) if group is not None else peer] += rows * row_bytes
        self.exchange.add_sent(bytes_to, dist.get_rank(), self.node_of_gpu)

    def reset(self) -> None:
        self.exchange, self.all_reduce = Traffic(), 0


class GatedExpert(torch.nn.Module):
    """One OLMoE expert as a module DeepSpeed's MoE copies: down(silu(gate) * up)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(hidden, 2 * inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


class DeepSpeedBlock(torch.nn.Module):
    """Stands in for a transformers MoE block: a DeepSpeed-style MoE layer (DeepSpeed's or GraceMoE), keeping
    its l_aux and expert counts for the loss and the load report."""

    def __init__(self, moe: torch.nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.l_aux = torch.zeros(())
        self.exp_counts: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, self.l_aux, self.exp_counts = self.moe(hidden)
        return out


def load_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True)


def expert_state_dicts(block) -> list[dict[str, torch.Tensor]]:
    """GatedExpert state dicts of a transformers block's fused experts."""
    experts = block.experts
    return [{"gate_up.weight": experts.gate_up_proj[e].detach().clone(), "down.weight": experts.down_proj[e].detach().clone()}
            for e in range(experts.gate_up_proj.shape[0])]


def deepspeed_model(variant: str, world: int, plans: dict[str, str], device: torch.device):
    """The embedded model with its MoE blocks as DeepSpeed MoE layers (deepspeed-moe) or GraceMoE (the others)."""
    from deepspeed.moe.layer import MoE

    from grace_ds.deepspeed_moe import GraceMoE
    from grace_ds.layer import GraceRuntime
    from grace_ds.plan import PlacementPlan

    model = load_model()
    config = model.config
    hidden, inner, experts, k = config.hidden_size, config.intermediate_size, config.num_experts, config.num_experts_per_tok
    gate = dict(k=k, capacity_factor=1.0, min_capacity=4, drop_tokens=False, use_rts=False)
    runtime = None
    if variant.startswith("grace"):
        policy, mode = ("contiguous", "flat") if variant == "grace-contiguous" else ("grace", "hierarchical")
        runtime = GraceRuntime(PlacementPlan.load(plans[policy]), communication=mode, device=device)
        runtime.measure = True  # pairs computed per layer, for the load report
    rank = dist.get_rank()
    for index, layer in enumerate(model.model.layers):
        block = layer.mlp
        if runtime is None:
            moe = MoE(hidden, GatedExpert(hidden, inner), experts, ep_size=world, top2_2nd_expert_sampling=False, **gate)
        else:
            moe = GraceMoE(hidden, GatedExpert(hidden, inner), experts, runtime, index, ep_size=world, **gate)
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(block.gate.weight)
            states = expert_state_dicts(block)
            if runtime is None:
                per_rank = experts // world
                for local, module in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                    module.load_state_dict(states[rank * per_rank + local])
            else:
                moe.deepspeed_moe.load_logical_experts(states)
        layer.mlp = DeepSpeedBlock(moe)
    return model.to(device), runtime


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Every weight times (1 + NOISE * n), n standard normal, the same draws on every rank (data-parallel
    weights stay equal across ranks)."""
    generator = torch.Generator().manual_seed(1234)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
        param.mul_(1 + NOISE * noise)


def engine_for(variant: str, world: int, plans: dict[str, str], args, device: torch.device):
    """(DeepSpeed engine, its GraceRuntime or None, the DeepSpeedBlocks or [])."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import grace_ds.deepspeed as grace_deepspeed

    config = {"train_micro_batch_size_per_gpu": args.sequences_per_rank, "gradient_clipping": args.clip,
              "zero_optimization": {"stage": args.zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}

    def optimizer(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    if variant.startswith("transformers"):
        model = load_model().to(device)
        if variant.endswith("/noise"):
            perturb(model)
        if variant.startswith("transformers/"):
            variant = "transformers"
        if variant == "transformers":
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model.parameters()), config=config)
            return engine, None, []
        config["grace_moe"] = {"plan": plans["grace"], "communication": "hierarchical"}
        engine, *_ = grace_deepspeed.initialize(model, config, optimizer=optimizer)
        from grace_ds.deepspeed_training import runtimes_of

        runtime = runtimes_of(engine.module)[0]
        runtime.measure = True
        return engine, runtime, []
    model, runtime = deepspeed_model(variant.removesuffix("/noise"), world, plans, device)
    if variant.endswith("/noise"):
        perturb(model)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    if runtime is None:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(groups), config=config)
    else:
        engine, *_ = grace_deepspeed.initialize(model, config, optimizer=optimizer(groups))
    blocks = [m for m in engine.module.modules() if isinstance(m, DeepSpeedBlock)]
    return engine, runtime, blocks


def batches(args, world: int, rank: int, device: torch.device):
    """Per step: this rank's [sequences_per_rank, sequence_length] byte ids; every variant gets the same."""
    from grace_ds.corpus import stdlib_bytes

    data = stdlib_bytes("train")
    generator = torch.Generator().manual_seed(args.seed)
    mine = slice(rank * args.sequences_per_rank, (rank + 1) * args.sequences_per_rank)
    for _ in range(args.steps):
        starts = torch.randint(0, data.numel() - args.sequence_length, (world * args.sequences_per_rank,),
                               generator=generator)[mine]
        yield torch.stack([data[s:s + args.sequence_length] for s in starts.tolist()]).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(variant: str, world: int, plans: dict[str, str], args, device: torch.device, wire: WireBytes) -> dict:
    from tqdm import tqdm

    rank = dist.get_rank()
    engine, runtime, blocks = engine_for(variant, world, plans, args, device)
    engine.train()
    experts = engine.module.config.num_experts
    counts = torch.zeros(experts, dtype=torch.float64)
    largest = []  # DeepSpeed's capacity per layer call comes from the largest local expert count
    losses, seconds = [], []
    wire.reset()
    steps = tqdm(batches(args, world, rank, device), total=args.steps, desc=variant, disable=rank != 0, leave=False)
    for ids in steps:
        synchronize(device)
        started = time.perf_counter()
        out = engine(ids, labels=ids)
        loss = out.loss + args.aux * sum(block.l_aux for block in blocks) if blocks else out.loss
        engine.backward(loss)
        engine.step()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
        for block in blocks:
            if block.exp_counts is not None and runtime is None:
                counts += block.exp_counts.detach().double().cpu()
                largest.append(float(block.exp_counts.max()))
    moved = torch.tensor([wire.exchange.cross_node_bytes, wire.exchange.intra_node_bytes, wire.all_reduce],
                         dtype=torch.float64) / args.steps
    mean_loss = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(mean_loss)  # the run's loss is the mean of the ranks' (DeepSpeed averages their gradients)
    result = {"variant": variant, "losses": (mean_loss / world).tolist(),
              "median_step_ms": statistics.median(seconds[args.warmup:]) * 1e3,
              "cross_node_bytes_per_step": float(moved[0]), "same_node_bytes_per_step": float(moved[1]),
              "all_reduce_bytes_per_step": float(moved[2])}
    pairs = torch.zeros(world, dtype=torch.float64)
    if runtime is not None:
        pairs[runtime.rank] = sum(t.pairs_computed for t in runtime.traffic) / args.steps
        result["replicas_apart"] = engine.max_replica_difference()
        result["mode_calls"] = dict(runtime.mode_calls)
    elif blocks:  # DeepSpeed's contiguous experts: rank r computes experts r * E/W ... (r + 1) * E/W - 1
        dist.all_reduce(counts)  # every rank's tokens per expert
        pairs[rank] = float(counts.view(world, -1)[rank].sum()) / args.steps
        # drop_tokens=False pads every expert's rows from every rank to the largest count (its capacity).
        capacity = torch.tensor(largest, dtype=torch.float64)
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX)
        result["padded_rows_per_gpu_per_step"] = float(capacity.sum()) * (experts // world) * world / args.steps
    if runtime is not None or blocks:
        dist.all_reduce(pairs)
        result["pairs_per_gpu_per_step"] = pairs.tolist()
        result["load_max_over_mean"] = float(pairs.max() / pairs.mean())
    step_ms = torch.tensor([result["median_step_ms"]], dtype=torch.float64)
    dist.all_reduce(step_ms, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    result["median_step_ms"] = float(step_ms)
    del engine
    return result


def worker(rank: int, world: int, nodes: int, port: int, args, plans: dict[str, str], result_file: str) -> None:
    import deepspeed

    from grace_ds.logical_nodes import join_logical_node

    device, backend = join_logical_node(rank, world, nodes, port, args.device)
    deepspeed.init_distributed(dist_backend=backend)
    wire = WireBytes(Topology.uniform(nodes, world // nodes).node_of_gpu.tolist())
    wire.install()
    try:
        results = []
        for variant in args.variants:
            torch.manual_seed(args.seed)
            results.append(train_variant(variant, world, plans, args, device, wire))
            if rank == 0:
                r = results[-1]
                print(f"{variant:20s} {r['median_step_ms']:9.1f} ms/step  cross-node {r['cross_node_bytes_per_step'] / 1e6:8.2f} MB"
                      f"  loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}", flush=True)
        if rank == 0:
            Path(result_file).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_plans(args, nodes: int, per_node: int, folder: Path) -> dict[str, str]:
    """Profile the model's routing on held-out text; the GRACE plan (replicas) and the contiguous one."""
    from grace_ds.corpus import stdlib_bytes
    from grace_ds.planners import make_plan
    from grace_ds.profiling import profile_model

    profile = profile_model(load_model().eval(), stdlib_bytes("heldout"), args.sequence_length, 8, args.profile_tokens)
    topology = Topology.uniform(nodes, per_node)
    paths = {}
    for policy, replicas in (("grace", args.replica_slots), ("contiguous", 0)):
        paths[policy] = str(folder / f"plan_{policy}.json")
        make_plan(policy, profile, topology, replica_slots=replicas).save(paths[policy])
    return paths


def parting_step(losses: list[float], reference: list[float], tolerance: float = 1e-5) -> int | None:
    """The first step (1-based) whose loss differs from the reference's by more than `tolerance`."""
    return next((step for step, (a, b) in enumerate(zip(losses, reference), 1) if abs(a - b) > tolerance), None)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, gaps) = plt.subplots(1, 2, figsize=(12, 4.2))
    by_name = {r["variant"]: r for r in results}
    for r in results:
        control = r["variant"].endswith("/noise")
        if not control:
            curves.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["variant"], linewidth=1)
        reference = by_name.get(REFERENCE.get(r["variant"], ""))
        if reference is not None:
            gap = [abs(a - b) for a, b in zip(r["losses"], reference["losses"])]
            gaps.semilogy(range(1, len(gap) + 1), [max(g, 1e-12) for g in gap], linestyle=":" if control else "-",
                          label=f"{r['variant']} vs {reference['variant']}", linewidth=1.5 if control else 1)
    curves.set(xlabel="step", ylabel="training loss (mean over ranks)", title="Loss curves")
    gaps.set(xlabel="step", ylabel="|loss difference| (floor 1e-12)",
             title="Difference from the reference (dotted: one-rounding control)")
    for axis in (curves, gaps):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: list[dict]) -> None:
    print(f"\n{'variant':20s} {'step ms':>9s} {'xnode MB':>9s} {'in-node MB':>10s} {'allreduce MB':>12s} "
          f"{'load max/mean':>13s} {'max |dloss|':>12s} {'parts at':>8s}")
    by_name = {r["variant"]: r for r in results}
    for r in results:
        reference = by_name.get(REFERENCE.get(r["variant"], ""))
        if reference is not None:
            parts = parting_step(r["losses"], reference["losses"])
            gap = (f"{max(abs(a - b) for a, b in zip(r['losses'], reference['losses'])):12.2e} "
                   f"{parts if parts is not None else 'never':>8}")
        else:
            gap = f"{'(reference)':>12s} {'':>8s}"
        load = f"{r['load_max_over_mean']:13.3f}" if "load_max_over_mean" in r else f"{'-':>13s}"
        print(f"{r['variant']:20s} {r['median_step_ms']:9.1f} {r['cross_node_bytes_per_step'] / 1e6:9.3f} "
              f"{r['same_node_bytes_per_step'] / 1e6:10.3f} {r['all_reduce_bytes_per_step'] / 1e6:12.3f} {load} {gap}")


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for bench_training.json and loss_curves.png")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the median step time")
    p.add_argument("--nodes", type=int, default=2, help="logical nodes")
    p.add_argument("--gpus-per-node", type=int, default=2, help="ranks per logical node")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--sequences-per-rank", type=int, default=2, help="sequences in a rank's micro-batch")
    p.add_argument("--sequence-length", type=int, default=64, help="tokens (bytes) per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="DeepSpeed gradient clipping (global norm)")
    # ZeRO 1-2 clip DeepSpeed's MoE by the exact global norm; without ZeRO its fp32 clipping averages the ranks'
    # own norms (grace_ds.deepspeed.initialize clips by the exact norm there too, so the runs would part).
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2), help="ZeRO stage")
    p.add_argument("--aux", type=float, default=0.01, help="weight of DeepSpeed's gate l_aux in the loss")
    p.add_argument("--replica-slots", type=int, default=1, help="replica slots per GPU and layer in the GRACE plan")
    p.add_argument("--profile-tokens", type=int, default=16384, help="held-out tokens profiled for the plans")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches")
    args = p.parse_args()
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    world = args.nodes * args.gpus_per_node
    if args.device == "cuda" and torch.cuda.device_count() < world:
        p.error(f"{world} ranks need {world} GPUs, {torch.cuda.device_count()} visible")
    from grace_ds.logical_nodes import free_port

    args.out.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"profiling the embedded model's routing ({args.profile_tokens} held-out tokens), planning "
              f"{args.nodes} x {args.gpus_per_node}", flush=True)
        plans = make_plans(args, args.nodes, args.gpus_per_node, Path(tmp))
        result_file = str(Path(tmp, "results.json"))
        mp.spawn(worker, args=(world, args.nodes, free_port(), args, plans, result_file), nprocs=world, join=True)
        results = json.loads(Path(result_file).read_text())
    by_name = {r["variant"]: r for r in results}
    for r in results:
        reference = by_name.get(REFERENCE.get(r["variant"], ""))
        if reference is not None:
            r["compared_with"] = reference["variant"]
            r["max_loss_difference"] = max(abs(a - b) for a, b in zip(r["losses"], reference["losses"]))
            r["parting_step"] = parting_step(r["losses"], reference["losses"])
    report = {"setting": {"commit": commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                          "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "device": args.device, "torch": torch.__version__,
                          "ranks": world, "nodes": args.nodes, "steps": args.steps,
                          "tokens_per_rank_per_step": args.sequences_per_rank * args.sequence_length,
                          "lr": args.lr, "clip": args.clip, "zero_stage": args.zero_stage,
                          "replica_slots": args.replica_slots, "seconds": round(time.time() - started, 1),
                          # other work on the machine slows the emulated ranks (times only, not bytes or loads)
                          "load_average_1min_start_end": [round(load_at_start, 2), round(os.getloadavg()[0], 2)]},
              "results": results}
    (args.out / "bench_training.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "loss_curves.png")
    print_table(results)
    print(f"\n-> {args.out / 'bench_training.json'}, {args.out / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
