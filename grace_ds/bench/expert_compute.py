"""One GPU's expert work, alone: the fused permute/unpermute of SlotExperts.weighted_sum against the
per-row path the exchanges took before it, and the grouped GEMMs alone (the floor for this work).

    python scripts/bench_expert_compute.py --traces DIR --out DIR                 (one GPU, bf16)
    python scripts/bench_expert_compute.py --traces DIR --out DIR --device cpu --tiny

This GPU is GPU 0 of `--gpus` holding the contiguous experts 0 .. E/gpus - 1; routing is the trace's
second half as bench_gpu.py replays it. Batches:
  prefill   the all-to-all exchanges: this GPU receives each token with a pair here once (rows) and
            computes its pairs; 32768 tokens in the job.
  decode-N  the gather exchange: every token of the job (N) with all its pairs, slot -1 on the pairs of
            other GPUs.
Paths:
  fused     weighted_sum as the exchanges call it (pairs sorted by row): one gather from the rows into
            slot order, grouped GEMMs, then back per row (a sparse product from SPARSE_SUM_MIN_PAIRS
            pairs, else a gather into pair order and a sum per row).
  scatter   weighted_sum for pairs in any order: the way back is one weighted scatter-add (atomics).
  per-row   what the exchanges did before: the pairs' rows copied out, forward (sort, copy, GEMMs, copy
            back), weighted, summed per row (prefill in the row dtype, as the all-to-all path did;
            decode in float32 over a [rows, k] view, as the gather path did).
  gemm      the grouped GEMMs on rows already in slot order.
Then the first shape's prefill pairs in growing prefixes (512 .. 65536 pairs): fused's way back as the
sparse product against the gather into pair order, for SPARSE_SUM_MIN_PAIRS.
Median of `--iters` after `--warmup`, CUDA events; decode batches also as CUDA-graph replays on the GPU
(how the runtime runs them: kernel launches then cost nothing). Writes expert_compute.json and prints a
table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grace_ds import experts as expert_module
from grace_ds.bench.gpu_cases import REPLAYS, SHAPES, TINY_SHAPES, map_ids
from grace_ds.bench.provenance import run_record
from grace_ds.experts import SlotExperts
from grace_ds.trace import RoutingTrace

PREFILL_TOKENS = 32768
DECODE_TOKENS = (256, 512)


def time_ms(work, iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of work() on the device's clock."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            started = time.perf_counter()
            work()
            elapsed = (time.perf_counter() - started) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def time_graphed_ms(work, iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of one replay of work() captured in a CUDA graph, as the runtime replays decode."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture (lazy init, workspace allocation)
            work()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return time_ms(graph.replay, iters, warmup, device)


def per_row_prefill(experts: SlotExperts, rows, pair_row, pair_slot, pair_weight) -> torch.Tensor:
    expert_out = experts(rows[pair_row], pair_slot)
    out = rows.new_zeros(rows.shape)
    return out.index_add(0, pair_row, (expert_out * pair_weight.unsqueeze(-1).to(expert_out.dtype)).to(out.dtype))


def per_row_gather(experts: SlotExperts, rows, pair_row, pair_slot, pair_weight, top_k: int) -> torch.Tensor:
    expert_out = experts(rows[pair_row], pair_slot)
    weighted = torch.where((pair_slot >= 0).unsqueeze(-1), expert_out.float() * pair_weight.unsqueeze(-1), 0.0)
    return weighted.view(rows.shape[0], top_k, -1).sum(1).to(rows.dtype)


def batches(ids: torch.Tensor, experts_here: int, hidden: int, dtype, device) -> dict[str, tuple]:
    """Per batch: (rows [R, H], pair_row, pair_slot, pair_weight) on the device."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    top_k = ids.shape[1]
    for name, tokens in [("prefill", PREFILL_TOKENS)] + [(f"decode-{n}", n) for n in DECODE_TOKENS]:
        chosen = ids[torch.arange(tokens) % ids.shape[0]]
        weight = torch.rand(tokens, top_k, generator=generator)
        weight = weight / weight.sum(-1, keepdim=True)
        here = chosen < experts_here
        if name == "prefill":  # rows this GPU received: tokens with a pair here, once each
            token_has = here.any(1)
            row_of_token = torch.cumsum(token_has.long(), 0) - 1
            token, k = here.nonzero(as_tuple=True)
            pair_row, pair_slot, pair_weight = row_of_token[token], chosen[token, k], weight[token, k]
            num_rows = int(token_has.sum())
        else:  # every token, every pair; other GPUs' pairs skipped
            pair_row = torch.arange(tokens).repeat_interleave(top_k)
            pair_slot = torch.where(here, chosen, -1).reshape(-1)
            pair_weight = weight.reshape(-1)
            num_rows = tokens
        rows = torch.randn(num_rows, hidden, generator=generator).to(dtype)
        out[name] = tuple(t.to(device) for t in (rows, pair_row, pair_slot, pair_weight.float()))
    return out


def sparse_sweep(experts: SlotExperts, rows, pair_row, pair_slot, pair_weight, iters: int, warmup: int,
                 device: torch.device) -> list[dict]:
    """The way back of weighted_sum by row, sparse product against gather into pair order, on growing
    prefixes of a batch's pairs (sorted by row): where SPARSE_SUM_MIN_PAIRS should sit."""
    out = []
    threshold = expert_module.SPARSE_SUM_MIN_PAIRS
    counts = [n for n in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536) if n <= pair_row.numel()]
    try:
        for n in counts:
            used_rows = rows[:int(pair_row[n - 1]) + 1]
            record = {"pairs": n}
            for label, minimum in (("sparse", 0), ("gather", 1 << 62)):
                expert_module.SPARSE_SUM_MIN_PAIRS = minimum
                record[f"{label}_ms"] = time_ms(lambda: experts.weighted_sum(used_rows, pair_row[:n], pair_slot[:n],
                                                                             pair_weight[:n], True),
                                                iters, warmup, device)
            out.append(record)
            print(f"sweep     pairs {n:6d}  sparse {record['sparse_ms']:7.3f}  gather {record['gather_ms']:7.3f} ms",
                  flush=True)
    finally:
        expert_module.SPARSE_SUM_MIN_PAIRS = threshold
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", required=True, help="folder with the routing traces (.bench_data on the GPU)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU check of the code path)")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs the experts are spread over")
    parser.add_argument("--shapes", default="olmoe,qwen3,dsv2lite")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu (with --tiny) to check the code path")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TINY_SHAPES if args.tiny else SHAPES
    results, sweep = [], []
    with torch.no_grad():
        for name in args.shapes.split(","):
            shape = shapes[name]
            file, layer, mapping = REPLAYS[name][0]
            path = Path(args.traces, file)
            if not path.is_file():
                sys.exit(f"{path} not found: --traces must hold {file}")
            ids = map_ids(RoutingTrace.load(path).topk_ids[:, layer].long(), mapping)
            ids = ids[ids.shape[0] // 2:]
            if shape.num_experts % args.gpus:
                sys.exit(f"{shape.num_experts} experts do not split over {args.gpus} GPUs")
            experts_here = shape.num_experts // args.gpus
            experts = SlotExperts(torch.arange(experts_here), shape.hidden, shape.inter, F.silu, dtype, device)
            experts.gate_up_proj.normal_(0, shape.hidden ** -0.5)
            experts.down_proj.normal_(0, shape.inter ** -0.5)
            for batch, (rows, pair_row, pair_slot, pair_weight) in batches(ids, experts_here, shape.hidden, dtype,
                                                                            device).items():
                gather = batch.startswith("decode")
                fused = lambda: experts.weighted_sum(rows, pair_row, pair_slot, pair_weight, True)  # noqa: E731
                scatter = lambda: experts.weighted_sum(rows, pair_row, pair_slot, pair_weight, False)  # noqa: E731
                if gather:
                    per_row = lambda: per_row_gather(experts, rows, pair_row, pair_slot, pair_weight,  # noqa: E731
                                                     shape.top_k)
                else:
                    per_row = lambda: per_row_prefill(experts, rows, pair_row, pair_slot, pair_weight)  # noqa: E731
                order, counts = experts.slot_order(pair_slot)
                sorted_rows = rows[pair_row[order]]
                gemm = lambda: experts.grouped(sorted_rows, counts)  # noqa: E731
                a, b, c = fused().float(), per_row().float(), scatter().float()
                scale = b.abs().max().clamp(min=1e-30)
                record = {"shape": name, "batch": batch, "rows": rows.shape[0], "pairs": pair_row.numel(),
                          "pairs_here": int((pair_slot >= 0).sum()),
                          "max_rel_diff": float(max((a - b).abs().max(), (c - b).abs().max()) / scale)}
                for label, work in (("fused", fused), ("scatter", scatter), ("per_row", per_row), ("gemm", gemm)):
                    record[f"{label}_ms"] = time_ms(work, args.iters, args.warmup, device)
                    if gather and device.type == "cuda" and experts.capturable:
                        record[f"{label}_graphed_ms"] = time_graphed_ms(work, args.iters, args.warmup, device)
                results.append(record)
                labels = ("fused", "scatter", "per_row", "gemm")
                if "fused_graphed_ms" in record:
                    print(f"{name:9s} {batch:11s} graphed: "
                          + "  ".join(f"{label} {record[f'{label}_graphed_ms']:7.3f}" for label in labels) + " ms", flush=True)
                print(f"{name:9s} {batch:11s} pairs {record['pairs']:6d} (here {record['pairs_here']:6d})  "
                      + "  ".join(f"{label} {record[f'{label}_ms']:7.3f}" for label in labels)
                      + f" ms  diff {record['max_rel_diff']:.1e}", flush=True)
                if batch == "prefill" and not sweep:  # the first shape's prefill pairs
                    sweep = [{"shape": name, **r} for r in sparse_sweep(experts, rows, pair_row, pair_slot,
                                                                        pair_weight, args.iters, args.warmup, device)]
            del experts
    setting = {**run_record(device.type), "dtype": str(dtype), "gpus": args.gpus, "iters": args.iters,
               "warmup": args.warmup, "tiny": args.tiny}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "expert_compute.json").write_text(json.dumps({"setting": setting, "results": results,
                                                                "sweep": sweep}, indent=1))
    print(f"\n{'shape':9s} {'batch':11s} {'fused':>8s} {'scatter':>8s} {'per-row':>8s} {'gemm':>8s}  per-row / fused"
          f"   permute+unpermute: fused / per-row (ms above gemm)")
    for r in results:
        print(f"{r['shape']:9s} {r['batch']:11s} {r['fused_ms']:8.3f} {r['scatter_ms']:8.3f} {r['per_row_ms']:8.3f} "
              f"{r['gemm_ms']:8.3f}  "
              f"{r['per_row_ms'] / r['fused_ms']:14.2f}x   {r['fused_ms'] - r['gemm_ms']:.3f} / "
              f"{r['per_row_ms'] - r['gemm_ms']:.3f}")


if __name__ == "__main__":
    main()
