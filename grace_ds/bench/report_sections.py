"""The sections of docs/benchmarks.md rendered from a GPU benchmark JSON: tables, ratios, findings, the
mode crossover, node groups, the whole-model rows, the cost model's form, the must-show checks and the
expert-compute table."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from grace_ds.bench.provenance import ROOT

DOCS = ROOT / "docs"
BASELINES = ("deepspeed-native", "megatron-alltoall", "deepspeed-autoep", "grace-layer/uniform-affinity/flat",
             "grace-layer/eplb/hierarchical",
             "grace-layer/eplb/flat", "grace-layer/contiguous/flat", "grace-layer/uniform-affinity/gather",
             "grace-layer/eplb/gather")


def grace_best(rows: list[dict]) -> dict:
    """The GRACE plan under its faster communication mode (what `auto` aims to pick)."""
    return min((r for r in rows if r["policy"] == "grace"), key=lambda r: r["median_ms"])


def layer_table(report: dict) -> list[str]:
    lines = ["| case | batch | variant | median ms | vs DeepSpeed | modeled ms (error) | floor ms (x) | "
             "cross-node MB | achieved GB/s | busiest GPU busy ms | idle % |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    results = report["results"]
    for r in results:
        native = next((x for x in results if x["case"] == r["case"] and x["batch"] == r["batch"]
                       and x["variant"] == "deepspeed-native"), None)  # not run under --variants
        vs_native = f"{native['median_ms'] / r['median_ms']:.2f}x" if native else "not run"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['variant']} | {r['median_ms']:.2f} | {vs_native} | "
            f"{r['modeled_ms']:.2f} ({r['model_error']:+.0%}) | "
            f"{r['floor_ms']:.2f} ({r['median_ms'] / r['floor_ms']:.2f}x) | {r['cross_node_bytes'] / 1e6:.1f} | "
            f"{r['achieved_cross_node_GBps']:.2f} | {max(r['gpu_busy_ms']):.2f} | "
            f"{100 * statistics.mean(r['idle_fraction']):.0f} |")
    return lines


def ratio_lines(report: dict) -> list[str]:
    """Plain ratios of the GRACE plan against every baseline, per case and batch."""
    lines = ["| case | batch | GRACE (grace plan) ms | " + " | ".join(f"vs {b}" for b in BASELINES) + " |",
             "|---|---|---:|" + "---:|" * len(BASELINES)]
    keys = sorted({(r["case"], r["batch"]) for r in report["results"]}, key=lambda k: (k[0], k[1]))
    for case, batch in keys:
        rows = [r for r in report["results"] if r["case"] == case and r["batch"] == batch]
        best = grace_best(rows)
        cells = []
        for name in BASELINES:
            other = next((r for r in rows if r["variant"] == name), None)
            cells.append(f"{other['median_ms'] / best['median_ms']:.2f}x" if other else "not run")
        lines.append(f"| {case} | {batch} | {best['median_ms']:.2f} ({best['mode']}) | " + " | ".join(cells) + " |")
    return lines


def _span(values: list[float], unit: str = "x") -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}{unit}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}{unit}"


def mode_crossover(report: dict) -> list[str]:
    """Tokens per GPU where the GRACE plan's hierarchical exchange starts to beat the flat one: the gap
    between them interpolated linearly from the largest decode batch to prefill, per case."""
    results = report["results"]
    per_gpu = report["setting"]["ranks"]
    out = []
    for case in sorted({r["case"] for r in results}):
        times = {(r["batch"], r["mode"]): r["median_ms"] for r in results if r["case"] == case and r["policy"] == "grace"}
        batches = sorted({b for b, _ in times if (b, "flat") in times and (b, "hierarchical") in times},
                         key=lambda b: report["setting"]["batches"][b])
        small = [b for b in batches if b.startswith("decode")]
        large = [b for b in batches if b.startswith("prefill")]
        if not small or not large:
            continue
        points = [(report["setting"]["batches"][b] / per_gpu, times[(b, "hierarchical")] - times[(b, "flat")])
                  for b in (small[-1], large[-1])]
        (t1, gap1), (t2, gap2) = points
        if gap1 > 0 > gap2:
            out.append(f"{case}: {t1 - gap1 * (t2 - t1) / (gap2 - gap1):.0f}")
    if not out:
        return []
    return ["- **flat or hierarchical**: the GRACE plan's hierarchical exchange overtakes the flat one at about "
            + ", ".join(out) + " tokens per GPU (linear between the largest decode batch and prefill; the "
            "runtime's `auto` goes flat below `hierarchical_min_tokens`, 512 by default, and takes the gather "
            "exchange up to `gather_max_tokens`, 128 by default)."]


def findings(report: dict) -> list[str]:
    """The issue's checks, computed from the results (ranges over cases)."""
    results = report["results"]
    out = []
    for kind in ("prefill", "decode"):
        keys = sorted({(r["case"], r["batch"]) for r in results if r["batch"].startswith(kind)})
        if not keys:
            continue
        ratios: dict[str, list[float]] = {b: [] for b in BASELINES}
        floors, errors = [], []
        for case, batch in keys:
            rows = [r for r in results if r["case"] == case and r["batch"] == batch]
            best = grace_best(rows)
            floors.append(best["median_ms"] / best["floor_ms"])
            for b in BASELINES:
                other = next((r for r in rows if r["variant"] == b), None)
                if other:
                    ratios[b].append(other["median_ms"] / best["median_ms"])
        errors = [abs(r["model_error"]) for r in results if r["batch"].startswith(kind)]
        within = sum(e <= 0.25 for e in errors)
        missed = sorted({r["variant"] for r in results if r["batch"].startswith(kind) and abs(r["model_error"]) > 0.25})
        out.append(f"- **{kind}**: GRACE (grace plan) is "
                   + "; ".join(f"{_span(v)} vs {b}" for b, v in ratios.items() if v)
                   + f" (faster when > 1); {_span(floors)} its floor; the modeled time is "
                   f"within 25% of the measured for {within} of {len(errors)} variants (largest error "
                   f"{max(errors):.0%}" + (f"; outside: {', '.join(missed)}" if missed else "") + ").")
    return out


def node_group_lines(report: dict) -> list[str]:
    """Each exchange with its in-node stages over node groups against the same over the job's group
    (time over the job's group / time with node groups, higher = node groups faster), per plan."""
    results = report["results"]
    rows = {(r["case"], r["batch"], r["variant"]): r for r in results}
    ratios: dict[tuple[str, str], list[float]] = {}
    for (case, batch, variant), r in rows.items():
        twin = rows.get((case, batch, variant.removesuffix("-node-groups")))
        if variant.endswith("-node-groups") and twin:
            kind = "prefill" if batch.startswith("prefill") else "decode"
            ratios.setdefault((kind, variant.removeprefix("grace-layer/")), []).append(twin["median_ms"] / r["median_ms"])
    if not ratios:
        return []
    return ["- **node groups** (in-node stages over a process group of each node, `grace_moe.node_groups`; "
            "time over the job's group / with node groups, higher = node groups faster): "
            + "; ".join(f"{kind} {variant} {_span(v)}" for (kind, variant), v in sorted(ratios.items())) + "."]


def model_lines(report: dict) -> list[str]:
    rows = report.get("model") or []
    if not rows:
        return ["(not run)"]
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    variants = list(dict.fromkeys((r["policy"], r["mode"]) for r in rows))
    lines = ["| plan / mode | " + " | ".join(batches) + " |", "|---|" + "---:|" * len(batches)]
    for policy, mode in variants:
        cells = [next(r["median_ms"] for r in rows if (r["policy"], r["mode"], r["batch"]) == (policy, mode, b))
                 for b in batches]
        lines.append(f"| {policy} / {mode} | " + " | ".join(f"{c:.2f} ms" for c in cells) + " |")
    return lines


def cost_model_form(report: dict) -> str:
    """How a run's modeled times were formed: with the host's launches after the last wait overlapping the
    device's work (runs that measured that tail), or summed."""
    tails = any(k.endswith("_host_tail_us") for k in report["links"])
    batch = report["setting"].get("fixed_cost_batch")
    return ("host overlap" if tails else "sum") + (f", fixed cost: {batch}" if batch else "")


def must_show_lines(runs: list[tuple[str, dict]]) -> list[str]:
    """The issue's must-shows per run (file name, report), so that run-to-run spread is in plain view:
    prefill, the GRACE plan with hierarchical exchange against DeepSpeed, uniform-affinity flat, eplb
    hierarchical and its own floor; decode, the GRACE plan's fastest exchange against the fastest baseline
    the issue names (DeepSpeed native, AutoEP, megatron, the other plans flat or hierarchical) and against
    the fastest other variant (other plans with the gather exchange included); the model's variants
    within 25%."""
    lines = ["| run | cross-node GB/s | case | prefill vs DeepSpeed | vs uniform-affinity flat | vs eplb hierarchical "
             "| / floor | decode: vs fastest baseline | decode: vs fastest other variant | model within 25% |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, report in runs:
        results = report["results"]
        within = sum(abs(r["model_error"]) <= 0.25 for r in results)
        for case in dict.fromkeys(r["case"] for r in results):
            rows = {(r["batch"], r["variant"]): r for r in results if r["case"] == case}
            prefill = [b for b, _ in rows if b.startswith("prefill")]
            cells = ["", "", "", ""]
            if prefill and (prefill[0], "grace-layer/grace/hierarchical") in rows:
                batch = prefill[0]
                grace = rows[(batch, "grace-layer/grace/hierarchical")]["median_ms"]
                ratio = [rows[(batch, v)]["median_ms"] / grace if (batch, v) in rows else None
                         for v in ("deepspeed-native", "grace-layer/uniform-affinity/flat", "grace-layer/eplb/hierarchical")]
                cells = [f"{x:.2f}x" if x else "" for x in ratio]
                cells.append(f"{grace / rows[(batch, 'grace-layer/grace/hierarchical')]['floor_ms']:.2f}x")
            baseline, anything = [], []
            for batch in dict.fromkeys(b for b, _ in rows if b.startswith("decode")):
                mine = [r for (b, _), r in rows.items() if b == batch and r["policy"] == "grace"]
                other = [r for (b, _), r in rows.items() if b == batch and r["policy"] != "grace"]
                for column, rivals in ((baseline, [r for r in other if not (r["mode"] or "").startswith("gather")]),
                                       (anything, other)):
                    if mine and rivals:
                        best, rival = grace_best(mine), min(rivals, key=lambda r: r["median_ms"])
                        column.append(f"{batch}: {rival['median_ms'] / best['median_ms']:.2f}x "
                                      f"({rival['variant'].removeprefix('grace-layer/')})")
            lines.append(f"| `{name}` | {report['links'].get('inter_node_GBps', 0):.2f} | {case} | " + " | ".join(cells)
                         + f" | {'; '.join(baseline)} | {'; '.join(anything)} | {within} of {len(results)} "
                         f"({cost_model_form(report)}) |")
    return lines


def expert_compute_lines(path: Path) -> list[str]:
    """The section on one GPU's expert work from scripts/bench_expert_compute.py's JSON."""
    run = json.loads(path.read_text())
    st = run["setting"]
    lines = [f"## One GPU's expert work: fused permute and unpermute (`{shown(path)}`)", "",
             f"`scripts/bench_expert_compute.py` (also run at the end of `bash scripts/bench_gpu.sh`) on one {st['device']}, "
             f"{st['dtype'].replace('torch.', '')}, torch {st['torch']}, {st['date']}: median of {st['iters']} after "
             f"{st['warmup']}, CUDA events. This GPU holds 1/{st['gpus']} of the experts; routing is the trace's "
             "replayed half. fused: `SlotExperts.weighted_sum`, the path every exchange takes (one gather from the "
             "rows straight into slot order, grouped GEMMs, then back per row as pairs arrive sorted by row: from "
             "`SPARSE_SUM_MIN_PAIRS` (8192) pairs on, outside gradients and graph capture, one sparse CSR x dense "
             "product of the weights with the outputs (runs from 2026-11-28 evening: "
             "`docs/expert-compute-h200.json`); below, and in earlier runs (`docs/history/expert-compute-h200-gather.json`), "
             "a gather back into pair order, weighting and a sum over each row's contiguous pairs). scatter: the "
             "same for pairs in any order, back "
             "by one weighted scatter-add (atomic adds). per-row: "
             "what the exchanges did before (the pairs' rows copied out, forward's own sort, copy and copy back, "
             "weighted, summed). gemm: the grouped GEMMs alone on rows already in slot order. permute + unpermute "
             "is the time above gemm. Decode rows are eager, so kernel launches count (the runtime replays "
             "decode as CUDA graphs).", "",
             "| shape | batch | rows | pairs (here) | fused ms | scatter ms | per-row ms | gemm ms | per-row / fused "
             "| permute + unpermute ms, fused / per-row | max rel. diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in run["results"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['rows']} | {r['pairs']} ({r['pairs_here']}) | "
                     f"{r['fused_ms']:.3f} | {r['scatter_ms']:.3f} | {r['per_row_ms']:.3f} | {r['gemm_ms']:.3f} | "
                     f"{r['per_row_ms'] / r['fused_ms']:.2f}x | {r['fused_ms'] - r['gemm_ms']:.3f} / "
                     f"{r['per_row_ms'] - r['gemm_ms']:.3f} | {r['max_rel_diff']:.1e} |")
    if run.get("sweep"):
        lines += ["", f"fused's way back by row on growing prefixes of the {run['sweep'][0]['shape']} prefill pairs: "
                  "the sparse product against the gather into pair order (eager; `SPARSE_SUM_MIN_PAIRS` sits "
                  "where they cross):", "", "| pairs | sparse ms | gather ms | gather / sparse |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['pairs']} | {r['sparse_ms']:.3f} | {r['gather_ms']:.3f} | {r['gather_ms'] / r['sparse_ms']:.2f}x |"
                  for r in run["sweep"]]
    graphed = [r for r in run["results"] if "fused_graphed_ms" in r]
    if graphed:
        lines += ["", "Decode as the runtime runs it, each path captured in a CUDA graph and replayed:", "",
                  "| shape | batch | fused ms | scatter ms | per-row ms | gemm ms | per-row / fused |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['shape']} | {r['batch']} | {r['fused_graphed_ms']:.3f} | {r['scatter_graphed_ms']:.3f} | "
                  f"{r['per_row_graphed_ms']:.3f} | {r['gemm_graphed_ms']:.3f} | "
                  f"{r['per_row_graphed_ms'] / r['fused_graphed_ms']:.2f}x |" for r in graphed]
    return lines + [""]


def shown(path: Path) -> str:
    """The path as a reader would type it from the repository root, when it lies inside."""
    path = path.resolve()
    return str(path.relative_to(DOCS.parent)) if path.is_relative_to(DOCS.parent) else str(path)
