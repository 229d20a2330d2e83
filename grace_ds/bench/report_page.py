"""docs/benchmarks.md and docs/benchmarks.png from the GPU benchmark's JSON (scripts/bench_gpu.py).

    python scripts/benchmark_report.py docs/bench-gpu-2x2.json [--earlier EARLIER.json ...] [--also OTHER.json ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grace_ds.bench.report_sections import (DOCS, cost_model_form, expert_compute_lines, findings, layer_table,
                                            model_lines, mode_crossover, must_show_lines, node_group_lines,
                                            ratio_lines, shown)


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
