"""docs/benchmarks.md and docs/benchmarks.png from the GPU benchmark's JSON (scripts/bench_gpu.py).

    python scripts/benchmark_report.py docs/bench-gpu-2x2.json [--earlier EARLIER.json ...] [--also OTHER.json ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
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


def plot(report: dict, path: Path) -> None:
    cases = list(dict.fromkeys(r["case"] for r in report["results"]))
    batches = list(dict.fromkeys(r["batch"] for r in report["results"]))
    variants = list(dict.fromkeys(r["variant"] for r in report["results"]))
    fig, axes = plt.subplots(len(batches), 1, figsize=(11, 3.2 * len(batches)))
    width = 0.8 / len(variants)
    colors = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors  # one colour per variant (up to 40)
    for ax, batch in zip(axes, batches):
        for v, variant in enumerate(variants):
            heights = [next((r["median_ms"] for r in report["results"]
                             if (r["case"], r["batch"], r["variant"]) == (c, batch, variant)), 0) for c in cases]
            ax.bar([i + v * width for i in range(len(cases))], heights, width, label=variant,
                   color=colors[v % len(colors)])
        ax.set_yscale("log")
        shown_ms = [r["median_ms"] for r in report["results"] if r["batch"] == batch]
        ax.set_ylim(min(shown_ms) / 2, max(shown_ms) * 1.3)  # every bar rises visibly from the axis
        ax.set_ylabel("MoE layer ms (log)")
        ax.set_title(batch)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    legend_rows = -(-len(labels) // 3)
    fig.tight_layout(rect=(0, 0.03 + 0.022 * legend_rows, 1, 1))  # room below the axes for the legend
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("--earlier", type=Path, action="append", default=[],
                   help="an earlier run of the same benchmark and layout, for run-to-run spread (repeatable)")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another run (e.g. with more baselines) shown in a section of its own")
    p.add_argument("--expert-compute", type=Path, help="scripts/bench_expert_compute.py's JSON: a section of its own")
    p.add_argument("--out", type=Path, default=DOCS / "benchmarks.md")
    args = p.parse_args()
    report = json.loads(args.report.read_text())
    setting, links = report["setting"], report["links"]
    plot(report, args.out.with_suffix(".png"))
    also_lines = []
    for path in args.also:
        other = json.loads(path.read_text())
        st = other["setting"]
        shapes = sorted({r["shape"] for r in other["results"]})
        what = f"({', '.join(shapes)} shape)" if shapes else "(whole model only)"
        also_lines += [f"## {st['nodes']} logical nodes x {st['gpus_per_node']} GPU{'s' if st['gpus_per_node'] > 1 else ''}: "
                       f"`{shown(path)}` {what}", "",
                       f"{st['device']}, run {st.get('date', '')}, {st['iters']} timed forwards after {st['warmup']}"
                       + (f" (modeled and floor columns recomputed by `bench_gpu.py --remodel` on {st['remodeled']})"
                          if st.get("remodeled") else "") + "; "
                       f"cost model: {cost_model_form(other)}; "
                       "its own link figures: " + ", ".join(f"{k} = {v:.4g}" for k, v in other["links"].items()) + ".",
                       ""]
        if other["results"]:
            also_lines += [*findings(other), *node_group_lines(other), "", *ratio_lines(other), "", *layer_table(other), ""]
        if other.get("model") and not other["results"]:
            also_lines += [f"Whole model ({other.get('model_trace')}, OLMoE shape, 2 layers, attention + MoE); "
                           "`auto` is the runtime's per-call choice:", "", *model_lines(other), ""]
    text = [
        "# GPU benchmark",
        "",
        f"Produced by `python scripts/benchmark_report.py {shown(args.report)}"
        + "".join(f" --earlier {shown(e)}" for e in args.earlier)
        + "".join(f" --also {shown(a)}" for a in args.also)
        + (f" --expert-compute {shown(args.expert_compute)}" if args.expert_compute else "")
        + "` from the raw JSON files beside this page, "
        f"each written by `bash scripts/bench_gpu.sh` on the GPU test machine ({setting['device']}, torch "
        f"{setting['torch']}) with its GPUs split into 2 logical nodes (NCCL_HOSTID per node: traffic between "
        "nodes takes NCCL's socket path, ~30 Gbit/s; inside a node NVLink).",
        "",
        "Median of 20 timed forwards after warm-up (each section says how many), CUDA events, the "
        "slowest rank per iteration; since 2026-11-28 the variants of one trace take turns, 4 rounds of 5 "
        "forwards each, so that the link's drift during a run falls on all of them alike (the cross-node "
        "rate itself differs by up to a third between runs: each run's is listed); bf16; random weights; routing replayed from real traces (gate top-k "
        "forced to the recorded experts through each implementation's own gate), plans built from the first "
        "half of each trace and the second half replayed. Tokens per forward in the whole job: "
        + ", ".join(f"{k} = {v}" for k, v in setting["batches"].items())
        + " (prefill 256 x 128 and 512 x 64 both bring 32768 tokens to a MoE layer).",
        "",
        "Variants: `deepspeed-native` (deepspeed.moe.layer.MoE, drop_tokens=False); `megatron-alltoall` "
        "(megatron-core's MoELayer, alltoall dispatcher, its local SequentialMLP experts: the grouped-GEMM ones "
        "need Transformer Engine or grouped_gemm); `deepspeed-autoep` (a transformers OLMoE sparse block at the "
        "shape that `deepspeed.initialize` swaps for DeepSpeed's AutoEPMoELayer through custom module patterns, "
        "0.19.8 having no OLMoE preset); `grace-layer/PLAN/EXCHANGE` (the GRACE layer with that plan and "
        "exchange). Shared experts (DeepSeek-V2-Lite) run beside the routed ones alike in all.",
        "",
        "Run it: `bash scripts/prepare_gpu_carry.sh` here (wheels and traces into the git-ignored `.whl/` and "
        "`.bench_data/`), then on the GPU machine `bash scripts/bench_gpu.sh` with both folders carried; it "
        "uses every GPU, split into 2 logical nodes. Then this script renders the page."
        + (f" Run date: {setting['date']}." if setting.get("date") else ""),
        "",
        "Columns. modeled ms: `grace-ds simulate`'s cost model with the run's measured link and GEMM figures "
        "(each rank uses the slowest rank's), the fixed layer cost included (`layer_overhead_us`, "
        "`gather_overhead_us`, `deepspeed_overhead_us`, `megatron_overhead_us`, `autoep_overhead_us`: one "
        "layer's time on a fixed-cost batch, timed in the same rounds as the case since 2026-11-28 "
        "(`fixed_costs` in the JSON), before that once per run; `hop_overhead_us`: what hierarchical adds); as "
        "that fixed cost holds every collective's start-up, the per-stage latencies are not added again. The "
        "fixed-cost batch: in `docs/bench-gpu-2x2.json` and `docs/bench-gpu-2x2-qwen3-dsv2lite.json` (and runs "
        "that name it) every expert gets one pair from every GPU (ceil(E/k) tokens per GPU: megatron's "
        "SequentialMLP launches no GEMM for an expert without rows, so one token per GPU left most of its "
        "launches out); in the earlier runs one token per GPU. Cost model `host overlap` (runs with "
        "`*_host_tail_us`): of the fixed cost, the host time from the layer's last wait for the device (the "
        "return of its last synchronising CUDA call, as torch's sync debug mode reports them) to the forward's "
        "return, median of 9 forwards on the slowest rank, is kernel launches that the device's work after "
        "that wait runs beside: modeled = (fixed - tail) + waited + max(tail, rest), where waited is the work "
        "the last wait waits for (none for flat, DeepSpeed, megatron and AutoEP, whose one wait, for split "
        "sizes or capacity, comes before any row moves; hierarchical too in runs that record "
        "`hierarchical_split_sizes`, where hop 2's split sizes travel with hop 1's, and in earlier runs its "
        "first stage, as hop 2's split sizes waited for hop 1's rows) and rest the remaining transfers and "
        "GEMMs; the gather exchange is one CUDA "
        "graph launched at the host's end, so it is summed. Cost model `sum`: fixed cost + transfers + GEMMs. "
        "For DeepSpeed, megatron and AutoEP the same terms over what they move and compute (capacity-padded "
        "rows; one copy per token and expert for the other two). `gather_ring_overhead_us`: the gather exchange's fixed cost "
        "over NCCL's ring collectives instead of by node (for comparison; the runtime gathers by node). floor: cross-node bytes through one node's link at the best "
        "measured rate (dispatch then combine) + the busiest GPU's expert FLOPs at the measured GEMM rate. "
        "achieved GB/s: cross-node bytes per node / layer time. busy: time in expert work per forward (for the GRACE "
        "layer since 2026-11-28 permute, grouped GEMMs and unpermute; before, from the pairs' rows to their outputs); "
        "idle: 1 - busy / layer time.",
        "",
        f"## The issue's must-shows, run by run ({setting['nodes']} logical nodes x {setting['gpus_per_node']} "
        "GPUs, higher = GRACE faster)",
        "",
        *must_show_lines([(shown(args.report), report)] + [(shown(e), json.loads(e.read_text())) for e in args.earlier]),
        "",
        *also_lines,
        f"## {setting['nodes']} logical nodes x {setting['gpus_per_node']} GPU{'s' if setting['gpus_per_node'] > 1 else ''}: "
        f"`{shown(args.report)}` "
        f"({', '.join(sorted({r['shape'] for r in report['results']}))} shape"
        f"{'s' if len({r['shape'] for r in report['results']}) > 1 else ''}"
        f"{', whole model' if report.get('model') else ''})",
        "",
        f"Cost model: {cost_model_form(report)}. Measured figures: "
        + ", ".join(f"{k} = {v:.4g}" for k, v in links.items()) + ".",
        "",
        "### Findings (ranges over the cases below)",
        "",
        *findings(report),
        *mode_crossover(report),
        *node_group_lines(report),
        "",
        "### Ratios: the GRACE plan against each baseline (higher = GRACE faster)",
        "",
        *ratio_lines(report),
        "",
        "### Every variant",
        "",
        *layer_table(report),
        "",
        "![MoE layer time per variant](benchmarks.png)",
        "",
        f"### Whole model ({report.get('model_trace')}, OLMoE shape, 2 layers, attention + MoE)",
        "",
        *model_lines(report),
        "",
    ]
    if args.expert_compute:
        text += expert_compute_lines(args.expert_compute)
    profile = DOCS / "profile-decode-h200x2.txt"
    if profile.is_file():
        text += ["## Where the decode time goes", "",
                 f"`{shown(profile)}`: torch.profiler over 10 decode-256 forwards of the GRACE layer (grace plan, "
                 "flat, 2 x 1), by `bash scripts/bench_gpu.sh --shapes olmoe --no-e2e --profile-decode`. Read "
                 "with the layer times above: the device is busy for a fraction of each forward (NCCL "
                 "all-to-alls, 4 per forward, most of it); the rest is host-side launch and wait time "
                 "(about a hundred kernel launches and twenty host-device copies per forward), which is "
                 "what the fixed `layer_overhead_us` measures. The gather exchange (no split-size exchange, no "
                 "host wait) and its CUDA graphs (one launch per layer) are the answer; their effect is in the "
                 "sections above.", ""]
    text += ["## Not run here", ""]
    others = [json.loads(a.read_text()) for a in args.also]
    if all(rep["setting"]["gpus_per_node"] < 2 for rep in [report] + others):
        text.append("- More than one GPU per node (2 x 2, the paper's setting; GPU kinds of 4 or more were not "
                    "lent): with one GPU per node the hierarchical mode equals the flat one and is not timed, and "
                    "the grouping can save only what a node-level dedup saves. The 2 x 2 figures are owed.")
    if not any(r["variant"] == "megatron-alltoall" for rep in [report] + [json.loads(a.read_text()) for a in args.also]
               for r in rep["results"]):
        text.append("- megatron-core's alltoall dispatcher (megatron-core was not installed for this run).")
    every_shape = {r["shape"] for rep in [report] + others for r in rep["results"]}
    missing = sorted(every_shape - {r["shape"] for r in report["results"]})
    if missing:
        text.append(f"- `{shown(args.report)}`: the {', '.join(missing)} shape{'s' if len(missing) > 1 else ''} "
                    "are in the other runs above, not in this one.")
    for path, other in zip(args.also, others):
        if not other.get("model") and other["setting"]["gpus_per_node"] > 1:
            text.append(f"- `{shown(path)}`: only the shapes and traces listed there; no whole-model run in that "
                        "run (the whole model ran with the OLMoE shape, in the main run).")
    if not any(r["variant"] == "deepspeed-autoep" for rep in [report] + others for r in rep["results"]):
        text += ["- DeepSpeed AutoEP (`deepspeed-autoep`: an OLMoE sparse block that `deepspeed.initialize` swaps for "
                 "its AutoEPMoELayer through custom module patterns, as DeepSpeed 0.19.8 has no OLMoE preset): the "
                 "variant came after these runs; it runs on CPU (gloo), GPU figures are owed."]
    text.append("")
    if args.earlier:
        earlier = [json.loads(e.read_text()) for e in args.earlier]
        text += ["## Run-to-run spread (earlier runs, same machine kind and layout)", "",
                 "| case | batch | variant | this run ms | " + " | ".join(f"`{shown(e)}` ms" for e in args.earlier) + " |",
                 "|---|---|---|---:|" + "---:|" * len(earlier)]
        for r in report["results"]:
            old = [next((f"{e['median_ms']:.2f}" for e in run["results"]
                         if (e["case"], e["batch"], e["variant"]) == (r["case"], r["batch"], r["variant"])), "")
                   for run in earlier]
            text.append(f"| {r['case']} | {r['batch']} | {r['variant']} | {r['median_ms']:.2f} | " + " | ".join(old) + " |")
        text.append("")
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
