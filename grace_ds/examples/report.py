"""The main job's report: DeepSpeed's native layout against GRACE, from two serve.py reports.

Prints a table, writes PNG plots (co-activation with the GRACE groups, per-GPU load before and after
replication, traffic per layer) and logs every figure and plot to Weights & Biases (offline unless
WANDB_MODE / WANDB_API_KEY say otherwise; a `wandb` section of the DeepSpeed JSON is honoured).
Usage: python -m grace_ds.examples.report --native N.json --grace G.json --profile P --plan PLAN [--ds-config C]
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path

import torch

from grace_ds.plan import PlacementPlan
from grace_ds.routing_profile import RoutingProfile


# Which rows a CPU emulation can speak for: bytes, balance and exactness follow from the plan and the
# routing alone; times need the GPUs and links the job is meant for.
ANY_DEVICE, GPUS_ONLY = "CPU emulation and GPUs", "GPUs only"
BENCHMARKS_PAGE = "docs/benchmarks.md"


def table(native: dict, grace: dict) -> list[tuple[str, str, str, str, str]]:
    """Rows (name, native, GRACE, GRACE / native, where the row is meaningful) from two serve.py reports."""
    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}x" if a else "-"

    rows = []
    for name, key in [("prefill tokens/s", "prefill_tokens_per_s"), ("decode tokens/s", "decode_tokens_per_s")]:
        if native.get(key) is not None:
            rows.append((name, f"{native[key]:,.0f}", f"{grace[key]:,.0f}", ratio(native[key], grace[key]), GPUS_ONLY))
    for name, key, scale, unit, where in [
            ("MoE-layer time, all layers (prefill)", "moe_seconds_per_layer", 1e3, " ms", GPUS_ONLY),
            ("cross-node bytes (prefill)", "cross_node_bytes_per_layer", 1e-6, " MB", ANY_DEVICE),
            ("intra-node bytes (prefill)", "intra_node_bytes_per_layer", 1e-6, " MB", ANY_DEVICE)]:
        a, b = sum(native[key]) * scale, sum(grace[key]) * scale
        rows.append((name, f"{a:,.2f}{unit}", f"{b:,.2f}{unit}", ratio(a, b), where))
    if "checkpoint_bytes_read_per_rank" in native:  # each rank reads the dense weights and its own experts
        a, b = max(native["checkpoint_bytes_read_per_rank"]) * 1e-6, max(grace["checkpoint_bytes_read_per_rank"]) * 1e-6
        rows.append((f"checkpoint read per rank, max (of {native['checkpoint_bytes'] * 1e-6:,.2f} MB)",
                     f"{a:,.2f} MB", f"{b:,.2f} MB", ratio(a, b), ANY_DEVICE))
    a = sum(native["max_over_mean_gpu_load_per_layer"]) / len(native["max_over_mean_gpu_load_per_layer"])
    b = sum(grace["max_over_mean_gpu_load_per_layer"]) / len(grace["max_over_mean_gpu_load_per_layer"])
    rows.append(("max/mean GPU load (mean over layers)", f"{a:.3f}", f"{b:.3f}", ratio(a, b), ANY_DEVICE))
    rows.append(("max abs logit difference to unmodified", f"{native['max_abs_logit_diff']:.2e}",
                 f"{grace['max_abs_logit_diff']:.2e}", "", ANY_DEVICE))
    rows.append(("generated text equal to unmodified", str(native["generated_text_equal"]),
                 str(grace["generated_text_equal"]), "", ANY_DEVICE))
    return rows


def header(native: dict, grace: dict) -> list[list[str]]:
    """The table's two header rows: what each column holds, then the topology and exchanges."""
    return [["", "native layout", "GRACE", "GRACE / native", "meaningful on"],
            [native["topology"], native["comm"], f"{grace['comm']}, {grace['router']}", "", ""]]


def timing_note(native: dict) -> str:
    """Says which rows this run can speak for, and where GPU timings are."""
    device = native.get("device", "cpu")
    if device != "cpu":
        return f"Measured on {device}; the GPU benchmark's tables: {BENCHMARKS_PAGE}."
    return ("CPU emulation: bytes, GPU load balance and exactness are what the plan gives on any device; the "
            "times (tokens/s, MoE-layer time) are loopback memory on shared cores, not GPU or network speed. "
            f"GPU timings: {BENCHMARKS_PAGE}.")


def text_table(rows: list[list[str]], header_rows: int) -> str:
    """Columns padded to their widest cell: the first left-aligned, the figures right-aligned; a rule
    under the header rows."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c in (0, len(widths) - 1) else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(header_rows, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plots(native: dict, grace: dict, profile: RoutingProfile, plan: PlacementPlan, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    # 1. Co-activation of every layer, experts ordered by the GPU holding their primary.
    if profile.coactivation is not None:
        fig = coactivation_figure(plt, profile, plan)
        paths["coactivation"] = out / "coactivation.png"
        fig.savefig(paths["coactivation"], dpi=110, bbox_inches="tight")
        plt.close(fig)
    # 2. Per-GPU load (pairs computed, measured) per layer: native layout vs GRACE.
    n_layers = len(native["pairs_per_gpu_per_layer"])
    fig, axes = plt.subplots(1, n_layers, figsize=(3 * n_layers, 3), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        a, b = native["pairs_per_gpu_per_layer"][i], grace["pairs_per_gpu_per_layer"][i]
        x = torch.arange(len(a)).float()
        ax.bar(x - 0.2, a, 0.4, label="native layout")
        ax.bar(x + 0.2, b, 0.4, label="GRACE")
        ax.set(title=f"layer {i}", xlabel="GPU", xticks=range(len(a)))
    axes[0][0].set_ylabel("(token, expert) pairs")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("per-GPU load, measured (prefill)")
    fig.tight_layout()
    paths["gpu_load"] = out / "gpu_load.png"
    fig.savefig(paths["gpu_load"], dpi=110)
    plt.close(fig)
    # 3. Traffic per layer.
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = torch.arange(n_layers).float()
    for offset, report, name in ((-0.2, native, "native layout"), (0.2, grace, "GRACE")):
        ax.bar(x + offset, [v / 1e6 for v in report["cross_node_bytes_per_layer"]], 0.4, label=f"{name}, cross-node")
        ax.bar(x + offset, [v / 1e6 for v in report["intra_node_bytes_per_layer"]], 0.4,
               bottom=[v / 1e6 for v in report["cross_node_bytes_per_layer"]], alpha=0.4, label=f"{name}, intra-node")
    ax.set(xlabel="MoE layer", ylabel="MB sent (all ranks)", title="traffic per layer (prefill)", xticks=range(n_layers))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    paths["traffic"] = out / "traffic.png"
    fig.savefig(paths["traffic"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def coactivation_figure(plt, profile: RoutingProfile, plan: PlacementPlan):
    """One panel per layer (small multiples, one shared log colour scale): co-activation counts with the
    experts ordered by the GPU of their primary copy, GPU groups ruled off, expert ids on the axes."""
    from matplotlib.colors import LogNorm

    layers, experts = profile.coactivation.shape[0], profile.num_experts
    columns = min(layers, 4)
    rows = -(-layers // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns + 1.0, 3.7 * rows), squeeze=False)
    homes = plan.gpu_of_expert_primary()
    counts = profile.coactivation.double()
    norm = LogNorm(vmin=1.0, vmax=max(float(counts.max()), 2.0))
    step = max(1, -(-experts // 16))  # at most 16 expert ids an axis stay legible
    image = None
    for layer, ax in enumerate(axes.flat):
        if layer >= layers:
            ax.axis("off")
            continue
        home = homes[layer]
        order = torch.argsort(home * experts + torch.arange(experts))
        co = counts[layer][order][:, order].clamp(min=norm.vmin)  # never co-activated: the scale's floor
        image = ax.imshow(co.numpy(), cmap="viridis", norm=norm, interpolation="nearest")
        for bound in torch.cumsum(torch.bincount(home, minlength=plan.num_gpus), 0)[:-1].tolist():
            ax.axhline(bound - 0.5, color="white", linewidth=0.8)
            ax.axvline(bound - 0.5, color="white", linewidth=0.8)
        ticks = list(range(0, experts, step))
        labels = [str(int(order[t])) for t in ticks]
        ax.set_xticks(ticks, labels, fontsize=6, rotation=90)
        ax.set_yticks(ticks, labels, fontsize=6)
        ax.set_title(profile.layer_names[layer] if profile.layer_names else f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert id", fontsize=8)
        if layer % columns == 0:
            ax.set_ylabel("expert id", fontsize=8)
    fig.suptitle(f"co-activation per layer, experts grouped by the GPU of their GRACE primary "
                 f"(white lines: GPU boundaries, {plan.topology.describe()})", fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="tokens routed to both experts")
    return fig


def log_wandb(native: dict, grace: dict, paths: dict[str, Path], ds_config: dict, out: Path) -> str:
    import wandb

    section = ds_config.get("wandb", {}) if isinstance(ds_config.get("wandb"), dict) else {}
    if section and not section.get("enabled", False):
        return "W&B: disabled by the DeepSpeed config"
    os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
    run = wandb.init(project=section.get("project", "grace_ds"), group=section.get("group"),
                     entity=section.get("team"), dir=str(out), job_type="main-job",
                     config={"native": {k: v for k, v in native.items() if not isinstance(v, list)},
                             "grace": {k: v for k, v in grace.items() if not isinstance(v, list)}})
    for label, report in (("native", native), ("grace", grace)):
        for key, value in report.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run.summary[f"{label}/{key}"] = value
        for i, (cross, intra, ratio) in enumerate(zip(report["cross_node_bytes_per_layer"],
                                                      report["intra_node_bytes_per_layer"],
                                                      report["max_over_mean_gpu_load_per_layer"])):
            run.log({f"{label}/cross_node_bytes": cross, f"{label}/intra_node_bytes": intra,
                     f"{label}/max_over_mean_gpu_load": ratio, "layer": i})
    run.log({name: wandb.Image(str(path)) for name, path in paths.items()})
    where = run.dir
    run.finish()
    return f"W&B run ({os.environ['WANDB_MODE']}): {where}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native", required=True)
    parser.add_argument("--grace", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--ds-config")
    parser.add_argument("--out", default="outputs")
    args = parser.parse_args()
    native, grace = (json.loads(Path(p).read_text()) for p in (args.native, args.grace))
    rows = table(native, grace)
    top, second = header(native, grace)
    markdown = [f"| {second[0]} | {top[1]} ({second[1]}) | {top[2]} ({second[2]}) | {top[3]} | {top[4]} |",
                "|---|---|---|---|---|"] + ["| " + " | ".join(row) + " |" for row in rows]
    markdown += ["", timing_note(native)]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.md").write_text("\n".join(markdown) + "\n")
    print("\n" + text_table([top, second] + [list(row) for row in rows], 2))
    print(textwrap.fill(timing_note(native), 110) + "\n")
    out = Path(args.out)
    paths = plots(native, grace, RoutingProfile.load(args.profile), PlacementPlan.load(args.plan), out)
    print("plots: " + ", ".join(str(p) for p in paths.values()))
    ds_config = json.loads(Path(args.ds_config).read_text()) if args.ds_config else {}
    print(log_wandb(native, grace, paths, ds_config, out))


if __name__ == "__main__":
    main()
