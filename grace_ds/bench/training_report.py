"""The training benchmark's outputs: where two runs part, the loss curves' plot and the printed table."""
from __future__ import annotations

from pathlib import Path

from grace_ds.bench.training_variants import REFERENCE


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

