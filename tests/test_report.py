"""The main job's report (grace_ds/examples/report.py): an aligned table that says which rows CPU emulation can
speak for, and a co-activation plot with every layer, a colour bar and expert ids."""
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from grace_ds.examples.report import BENCHMARKS_PAGE, GPUS_ONLY, coactivation_figure, header, table, text_table, timing_note  # noqa: E402
from grace_ds.planners import make_plan  # noqa: E402
from grace_ds.routing_profile import RoutingProfile  # noqa: E402
from grace_ds.topology import Topology  # noqa: E402
from tests.conftest import tiny_trace  # noqa: E402


def _report(comm: str, **figures) -> dict:
    base = {"topology": "2 nodes x 2 GPUs", "comm": comm, "router": "tar", "prefill_tokens_per_s": 2000.0,
            "decode_tokens_per_s": 20.0, "moe_seconds_per_layer": [0.1, 0.2], "cross_node_bytes_per_layer": [4e6, 4e6],
            "intra_node_bytes_per_layer": [2e6, 2e6], "max_over_mean_gpu_load_per_layer": [1.2, 1.4],
            "max_abs_logit_diff": 1e-5, "generated_text_equal": True, "device": "cpu"}
    return {**base, **figures}


def test_table_is_aligned_and_marks_times_as_meaningful_on_gpus_only():
    native, grace = _report("flat"), _report("auto: 12 hierarchical, 28 gather", cross_node_bytes_per_layer=[2e6, 2e6])
    rows = table(native, grace)
    where = {name: meaningful for name, *_, meaningful in rows}
    assert {name for name, m in where.items() if m == GPUS_ONLY} == {
        "prefill tokens/s", "decode tokens/s", "MoE-layer time, all layers (prefill)"}
    assert dict((r[0], r[3]) for r in rows)["cross-node bytes (prefill)"] == "0.50x"
    cells = header(native, grace) + [list(r) for r in rows]
    lines = text_table(cells, 2).splitlines()
    # Every cell lies within its column's rule, on every line, the long second header row included.
    rule = lines.pop(2)
    columns = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    assert len(columns) == 5 and len(lines) == len(cells)
    for line, row in zip(lines, cells):
        assert [line[a:b].strip() for a, b in columns] == row, line
    note = timing_note(native)
    assert "CPU emulation" in note and BENCHMARKS_PAGE in note and "not GPU" in note
    assert "CPU emulation" not in timing_note(_report("flat", device="cuda"))


def test_coactivation_figure_shows_every_layer_with_a_colour_bar_and_expert_ids():
    trace = tiny_trace(tokens=256, layers=3, experts=8, top_k=2)
    profile = RoutingProfile.from_topk_ids(trace, 8)
    plan = make_plan("grace", profile, Topology.uniform(2, 2), 1)
    fig = coactivation_figure(plt, profile, plan)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3  # one per layer
    assert [ax.get_label() for ax in fig.axes if ax not in panels] == ["<colorbar>"]
    homes = plan.gpu_of_expert_primary()
    for layer, ax in enumerate(panels):
        ids = [int(t.get_text()) for t in ax.get_xticklabels()]
        assert sorted(ids) == list(range(8)), ids  # expert ids, not positions
        assert [int(homes[layer][e]) for e in ids] == sorted(int(homes[layer][e]) for e in ids)  # grouped by GPU
    plt.close(fig)
