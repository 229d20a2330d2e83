"""Loading benchmark: what each rank must hold to start serving, the model loaded whole and converted
(`init_inference(model)`) against the checkpoint read rank by rank (`init_inference(directory)`).

The checkpoint has a real model's shape with random bf16 weights: OLMoE-1B-7B by default (64 experts,
top-8, hidden 2048, expert intermediate 1024, vocabulary 50304), --layers of its 16 MoE layers. The plan is
GRACE's (one replica slot a GPU) from real OLMoE routing (../shared/data/routing/olmoe_arxiv.safetensors,
whose layers 0, 7 and 15 stand for the model's layers nearest in depth). Each way runs in fresh processes
(N x G ranks emulating nodes on this host), so that a rank's peak resident memory is its own:

  model       from_pretrained (the whole model, bf16), then grace_ds.deepspeed.init_inference(model)
  directory   grace_ds.deepspeed.init_inference(directory): dense weights and this rank's experts only

Per rank: peak resident memory (the process's high-water mark, VmHWM: Python, torch and DeepSpeed included,
whose share is the resident memory before loading), bytes of weights it holds when serving, bytes read, seconds
to a served engine (on CUDA also the GPU's peak allocated memory); then one forward of the same tokens, whose
logits the two ways must give alike.

    python scripts/bench_loading.py --out docs/loading-2x2-cpu [--layers 3] [--nodes 2 --gpus-per-node 2]
Writes OUT/bench_loading.json (with the commit, command and machine) and OUT/peak_memory.png.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grace_ds.bench.provenance import ROOT, run_record
from grace_ds.bench.training import world_of

WAYS = ("model", "directory")
TRACE = ROOT.parent / "shared" / "data" / "routing" / "olmoe_arxiv.safetensors"
OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                   num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096)


def write_checkpoint(folder: Path, layers: int) -> int:
    """An OLMoE-1B-7B-shaped checkpoint with `layers` layers and random bf16 weights; returns its bytes."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(**OLMOE_1B_7B, num_hidden_layers=layers)
    with torch.device("cpu"):
        model = OlmoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_plan_file(path: Path, layers: int, nodes: int, per_node: int, replica_slots: int, trace: Path) -> None:
    """GRACE's plan for the model's layers from real OLMoE routing: model layer l takes the trace layer
    nearest in depth (the trace holds layers 0, 7 and 15 of 16)."""
    from grace_ds.planners import make_plan
    from grace_ds.routing_profile import RoutingProfile
    from grace_ds.topology import Topology
    from grace_ds.trace import RoutingTrace

    recorded = RoutingTrace.load(trace)
    depths = [int(name.removeprefix("layer_")) for name in recorded.layer_names]  # of 16
    nearest = [min(range(len(depths)), key=lambda i: abs(depths[i] - layer * 15 / max(1, layers - 1)))
               for layer in range(layers)]
    profile = RoutingProfile.from_topk_ids(recorded.topk_ids.long()[:, nearest], recorded.num_experts)
    make_plan("grace", profile, Topology.uniform(nodes, per_node), replica_slots=replica_slots).save(path)


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or its peak (VmHWM). Not getrusage's ru_maxrss: a spawned
    process is forked before its exec, and Linux folds the forking parent's peak into the child's maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def worker(rank: int, world: int, nodes: int, port: int, way: str, args, folder: str) -> None:
    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.logical_nodes import join_logical_node

    device, _ = join_logical_node(rank, world, nodes, port, args.device)
    folder = Path(folder)
    config = {"dtype": "bf16", "replace_with_kernel_inject": False,
              "grace_moe": {"plan": str(folder / "plan.json"), "communication": "flat"}}
    try:
        dist.barrier()
        before = resident_bytes()
        start = time.perf_counter()
        if way == "model":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder / "checkpoint", dtype=torch.bfloat16)
            engine = grace_deepspeed.init_inference(model, config)
            del model
        else:
            engine = grace_deepspeed.init_inference(str(folder / "checkpoint"), config)
        seconds = time.perf_counter() - start
        ids = torch.randint(0, OLMOE_1B_7B["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            logits = engine(ids.to(device)).logits.float().cpu()
        torch.save(logits, folder / f"logits-{way}-{rank}.pt")
        held = sum(t.numel() * t.element_size() for t in engine.module.state_dict().values())
        loaded = engine.grace_load  # None when loaded whole
        peak = resident_bytes("VmHWM")
        record = {"rank": rank, "resident_before_bytes": before, "peak_resident_bytes": peak, "held_bytes": held,
                  "read_bytes": loaded and loaded.read_bytes, "dense_bytes": loaded and loaded.dense_bytes,
                  "expert_bytes": loaded and loaded.expert_bytes, "described": loaded and loaded.describe(),
                  "seconds": seconds,
                  "device_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
        (folder / f"rank-{way}-{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def plot(results: dict, checkpoint_bytes: int, out: Path) -> Path:
    """Peak resident memory per rank, each way, beside the checkpoint's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2 ** 30
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ranks = [r["rank"] for r in results["model"]]
    width = 0.38
    for offset, way, colour in ((-width / 2, "model", "#b0b0b0"), (width / 2, "directory", "#2a7ab0")):
        label = {"model": "init_inference(model): loaded whole", "directory": "init_inference(directory)"}[way]
        ax.bar([r + offset for r in ranks], [r["peak_resident_bytes"] / gib for r in results[way]], width,
               color=colour, label=label)
    ax.axhline(checkpoint_bytes / gib, color="black", linestyle="--", linewidth=1)
    ax.text(ranks[-1] + 0.45, checkpoint_bytes / gib, "checkpoint", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title("Host memory a rank needs to start serving", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path = out / "peak_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for bench_loading.json and peak_memory.png")
    p.add_argument("--layers", type=int, default=3, help="MoE layers of the OLMoE-1B-7B shape (it has 16)")
    p.add_argument("--nodes", type=int, default=2, help="logical nodes")
    p.add_argument("--gpus-per-node", type=int, default=2, help="ranks per logical node")
    p.add_argument("--replica-slots", type=int, default=1, help="replica slots per GPU and layer in the plan")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--trace", type=Path, default=TRACE, help="OLMoE routing trace the plan is made from")
    p.add_argument("--workdir", type=Path, help="where the checkpoint is written (default: a temporary folder)")
    args = p.parse_args()
    if args.layers < 1:
        p.error("--layers must be at least 1")
    if not args.trace.is_file():
        p.error(f"{args.trace}: no such routing trace")
    world = world_of(p, args)
    from grace_ds.logical_nodes import free_port

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        print(f"writing an OLMoE-1B-7B-shaped checkpoint of {args.layers} layers (random bf16 weights)", flush=True)
        checkpoint_bytes = write_checkpoint(folder / "checkpoint", args.layers)
        make_plan_file(folder / "plan.json", args.layers, args.nodes, args.gpus_per_node, args.replica_slots,
                       args.trace)
        results = {}
        for way in WAYS:
            print(f"serving on {world} ranks, {way}", flush=True)
            mp.spawn(worker, args=(world, args.nodes, free_port(), way, args, str(folder)), nprocs=world, join=True)
            results[way] = [json.loads((folder / f"rank-{way}-{r}.json").read_text()) for r in range(world)]
        logits_apart = max(float((torch.load(folder / f"logits-model-{r}.pt")
                                  - torch.load(folder / f"logits-directory-{r}.pt")).abs().max()) for r in range(world))
    report = {"setting": {**run_record(args.device), "ranks": world, "nodes": args.nodes, "layers": args.layers,
                          "shape": OLMOE_1B_7B, "replica_slots": args.replica_slots, "trace": args.trace.name,
                          "checkpoint_bytes": checkpoint_bytes},
              "ways": results, "max_abs_logit_difference": logits_apart}
    (args.out / "bench_loading.json").write_text(json.dumps(report, indent=1) + "\n")
    gib = 2 ** 30
    print(f"\ncheckpoint {checkpoint_bytes / gib:.2f} GiB, {world} ranks; per rank (max over ranks):")
    print(f"{'way':10s} {'peak resident':>14s} {'before loading':>15s} {'weights held':>13s} {'read':>9s} {'seconds':>8s}")
    for way in WAYS:
        rows = results[way]
        read = max(r["read_bytes"] or 0 for r in rows) / gib if way == "directory" else checkpoint_bytes / gib
        print(f"{way:10s} {max(r['peak_resident_bytes'] for r in rows) / gib:11.2f} GiB "
              f"{max(r['resident_before_bytes'] for r in rows) / gib:12.2f} GiB {max(r['held_bytes'] for r in rows) / gib:9.2f} GiB "
              f"{read:5.2f} GiB {max(r['seconds'] for r in rows):8.1f}")
    print(f"rank 0, init_inference(directory): {results['directory'][0]['described']}")
    print(f"largest logit difference between the two ways: {logits_apart:.3g}")
    print(f"plot: {plot(results, checkpoint_bytes, args.out)}")
