"""Online re-planning in the simulator: plan on one domain, then serve another.

A stream of serving steps (`--step-tokens` tokens each, spread over the GPUs) replays a trace of the
planning domain's held-out half, then the other domain's trace. Policies, same window and interval:
  grace-offline   the GRACE plan made on the first domain, never changed (the paper)
  grace-online    grace_ds.online's decision: drift check every interval, bounded incremental re-plan
                  (at most --max-moves copies), switched at the next step
  grace-periodic  a GRACE plan from scratch on the window every interval (no bound on moved copies)
  eplb-periodic   SGLang / vLLM style: an EPLB plan from scratch on the window every interval
(the decisions are grace_ds.online.decide_replan's, as the runtime takes them). Every step is simulated
under the plan served at that step (modeled layer time with the runtime's communication mode, max/mean
GPU load, GPU copies per token); copies moved are the experts GPUs must newly receive (plans from
scratch renumbered to keep copies in place). Writes docs/online-replanning.{md,json,png}.

    python scripts/online_replanning.py                 # both directions, OLMoE traces, 2 nodes x 2 GPUs
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from grace_ds.bench.online_common import POLICY_KINDS, add_replanning_options, first_plan_policy, online_settings
from grace_ds.bench.provenance import ROOT, run_record
from grace_ds.cost import CostSettings
from grace_ds.online import decide_replan
from grace_ds.planners import make_plan
from grace_ds.planners.incremental import copies_to_receive
from grace_ds.routing_profile import RoutingProfile
from grace_ds.routing import ReplicaRouter
from grace_ds.routing_stats import RoutingStats
from grace_ds.simulate import simulate_trace, summarize, token_gpus
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace

POLICIES = tuple(POLICY_KINDS)
METRICS = ("modeled_layer_time_us", "max_over_mean_gpu_load", "gpu_copies_per_token")


def expert_copy_bytes(cost: CostSettings) -> int:
    """One expert's weights (gate, up, down projections) in the cost model's dtype."""
    return 3 * cost.hidden * cost.ffn_hidden * cost.dtype_bytes


def run_policy(policy: str, first: torch.Tensor, stream: torch.Tensor, topology: Topology, args,
               cost: CostSettings, progress) -> dict:
    """first [T, L, k] planning tokens; stream [steps, step_tokens, L, k]. Per-step metrics and moves."""
    num_experts = int(max(first.max(), stream.max())) + 1
    initial = RoutingProfile.from_topk_ids(first, num_experts)
    plan = make_plan(first_plan_policy(policy), initial, topology, args.replica_slots)
    settings = online_settings(policy, args, plan_delay_steps=args.plan_delay)
    window = RoutingStats(plan.num_layers, num_experts, first.shape[-1], sample_tokens=settings.sample_tokens,
                          window_steps=settings.window_steps, buckets=settings.window_buckets, num_gpus=plan.num_gpus,
                          slots_per_gpu=plan.slots_per_gpu)
    sources = token_gpus(stream.shape[1], plan.num_gpus)
    router = ReplicaRouter(plan)  # the simulator's router: every GPU a source, as simulate_trace routes
    mode_key = "modeled_layer_time_us" if args.mode == "hierarchical" else "modeled_layer_time_us_flat"
    steps, events, unfinished, pending = [], [], False, None
    for step, tokens in enumerate(stream):
        if pending is not None and step >= pending[0]:
            plan, pending = pending[1], None
            router = ReplicaRouter(plan)
            window.forget_gpu_loads()
        summary = summarize(simulate_trace(plan, tokens, cost=cost))
        steps.append({"step": step, "modeled_layer_time_us": summary[mode_key],
                      "max_over_mean_gpu_load": summary["max_over_mean_gpu_load"],
                      "gpu_copies_per_token": summary["gpu_copies_per_token"]})
        for layer in range(plan.num_layers):  # with the physical picks: drift is measured on them
            window.observe(layer, tokens[:, layer], router.route(layer, tokens[:, layer], sources))
        window.end_step()
        progress.update(1)
        done = step + 1
        # The runtime's schedule (grace_ds.online): a check every interval once half a window is in.
        if (policy == "grace-offline" or pending is not None or done % settings.interval_steps
                or done < settings.window_steps // 2):
            continue
        started = time.perf_counter()
        record, result = decide_replan(plan, *window.totals(), settings, unfinished, args.mode)
        if result is None:
            continue
        unfinished = result.budget_exhausted
        events.append({"step": done, "copies_moved": copies_to_receive(plan, result.plan),
                       "planning_s": time.perf_counter() - started, "drift": record["drift"]})
        # The runtime plans on a thread, posts the transfers plan_delay_steps later, switches one step after.
        pending = (done + settings.plan_delay_steps + 1, result.plan)
    return {"steps": steps, "events": events}


def mean_over(steps: list[dict], key: str, start: int, end: int) -> float:
    values = [s[key] for s in steps[start:end]]
    return sum(values) / len(values)


def scenario(name: str, plan_trace: torch.Tensor, serve_trace: torch.Tensor, args, cost) -> dict:
    half = plan_trace.shape[0] // 2
    first = plan_trace[:half]
    same = plan_trace[half:]
    other = serve_trace[: args.serve_tokens]
    tokens = torch.cat([same, other])
    usable = tokens.shape[0] // args.step_tokens * args.step_tokens
    stream = tokens[:usable].view(-1, args.step_tokens, *tokens.shape[1:])
    drift_step = same.shape[0] // args.step_tokens
    topology = Topology.uniform(args.nodes, args.gpus_per_node)
    out = {"name": name, "drift_step": drift_step, "steps": int(stream.shape[0]), "policies": {}}
    with tqdm(total=len(POLICIES) * stream.shape[0], desc=name, unit="step") as progress:
        for policy in POLICIES:
            out["policies"][policy] = run_policy(policy, first, stream, topology, args, cost, progress)
    # Settled: the second half of the new domain, after re-planning had time to act.
    settle = drift_step + (stream.shape[0] - drift_step) // 2
    for policy, result in out["policies"].items():
        result["summary"] = {
            **{f"{key}_before_drift": mean_over(result["steps"], key, 0, drift_step) for key in METRICS},
            **{f"{key}_after_drift": mean_over(result["steps"], key, drift_step, stream.shape[0]) for key in METRICS},
            **{f"{key}_settled": mean_over(result["steps"], key, settle, stream.shape[0]) for key in METRICS},
            "copies_moved": sum(e["copies_moved"] for e in result["events"]),
            "replans": len(result["events"]),
            "bytes_moved": sum(e["copies_moved"] for e in result["events"]) * expert_copy_bytes(cost),
            "planning_s_mean": (sum(e["planning_s"] for e in result["events"]) / len(result["events"])
                                if result["events"] else 0.0),
        }
    out["settle_step"] = settle
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 7), squeeze=False)
    for column, result in enumerate(results):
        for policy, data in result["policies"].items():
            steps = [s["step"] for s in data["steps"]]
            axes[0, column].plot(steps, [s["modeled_layer_time_us"] / 1e3 for s in data["steps"]], label=policy,
                                 linewidth=1.2)
            moved, total = [], 0
            by_step = {e["step"]: e["copies_moved"] for e in data["events"]}
            for step in steps:
                total += by_step.get(step, 0)
                moved.append(total)
            axes[1, column].plot(steps, moved, label=policy)
        for row in range(2):
            axes[row, column].axvline(result["drift_step"], color="grey", linestyle=":", linewidth=1)
        axes[0, column].set_title(f"{result['name']}: domain changes at the dotted line")
        axes[0, column].set_ylabel("modeled MoE-layer time per step (ms)")
        axes[1, column].set_ylabel("expert copies moved (cumulative)")
        axes[1, column].set_xlabel("serving step")
        axes[0, column].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: list[dict], args, path: Path, seconds: float, gpu_lines: list[str]) -> None:
    lines = [
        "# Online re-planning: plan on one domain, serve another (simulator)",
        "",
        f"Measured {datetime.date.today()} by `python scripts/online_replanning.py` ({seconds:.0f} s on this 2-core "
        "machine; raw numbers in `online-replanning.json`). OLMoE routing traces from `../shared/data/routing` "
        f"(3 layers, 64 experts, top-8), {args.nodes} nodes x {args.gpus_per_node} GPUs, {args.replica_slots} replica "
        f"slot per GPU, steps of {args.step_tokens} tokens, modeled time of the {args.mode} exchange (hidden 2048, "
        "bf16, 25 Gbit/s between nodes). Each stream serves the planning domain's held-out half, then the other "
        f"domain's first {args.serve_tokens} tokens. Window {args.window_steps} steps, check every {args.interval} "
        f"steps, drift threshold {args.drift_threshold}, at most {args.max_moves} copies moved per GRACE online "
        f"re-plan; periodic policies re-plan from scratch at every check. A re-plan serves from {args.plan_delay + 1} "
        "steps after its check (planned on a thread, transfers posted, switch at the next boundary), as in the runtime. A copy is one expert's weights "
        f"({expert_copy_bytes(CostSettings()) / 2**20:.0f} MiB at OLMoE's shape); a from-scratch plan counts the "
        "experts each GPU must newly receive.",
        "",
        "![time per step and copies moved](online-replanning.png)",
        "",
    ]
    for result in results:
        lines += [f"## {result['name']}", "",
                  f"Domain changes at step {result['drift_step']} of {result['steps']}; 'settled' averages steps "
                  f"{result['settle_step']}-{result['steps'] - 1}.", "",
                  "| policy | layer time before drift (ms) | after drift (ms) | settled (ms) | max/mean load settled "
                  "| GPU copies/token settled | re-plans | copies moved | GiB moved | planning s / re-plan |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for policy, data in result["policies"].items():
            s = data["summary"]
            lines.append(f"| {policy} | {s['modeled_layer_time_us_before_drift'] / 1e3:.2f} | "
                         f"{s['modeled_layer_time_us_after_drift'] / 1e3:.2f} | {s['modeled_layer_time_us_settled'] / 1e3:.2f} | "
                         f"{s['max_over_mean_gpu_load_settled']:.3f} | {s['gpu_copies_per_token_settled']:.3f} | "
                         f"{s['replans']} | {s['copies_moved']} | {s['bytes_moved'] / 2**30:.2f} | {s['planning_s_mean']:.2f} |")
        lines.append("")
        p = {name: data["summary"] for name, data in result["policies"].items()}
        online = p["grace-online"]
        lines += [f"Reading: settled, online GRACE runs {online['modeled_layer_time_us_settled'] / p['grace-offline']['modeled_layer_time_us_settled']:.3f}x "
                  f"the time of the plan kept from the first domain, "
                  f"{online['modeled_layer_time_us_settled'] / p['eplb-periodic']['modeled_layer_time_us_settled']:.3f}x periodic EPLB's and "
                  f"{online['modeled_layer_time_us_settled'] / p['grace-periodic']['modeled_layer_time_us_settled']:.3f}x periodic GRACE's, moving "
                  f"{online['copies_moved'] / max(p['eplb-periodic']['copies_moved'], 1):.3f}x and "
                  f"{online['copies_moved'] / max(p['grace-periodic']['copies_moved'], 1):.3f}x their expert copies.", ""]
    path.write_text("\n".join(lines + gpu_lines))


def gpu_section(paths: list[Path], out: Path) -> list[str]:
    """Tables (and a plot) from scripts/bench_online.py's JSON files: the same policies on real devices."""
    if not paths:
        return []
    lines = ["## On GPUs: real weights moved, real step times", ""]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(6.5 * len(paths), 3.6), squeeze=False)
    for column, path in enumerate(paths):
        report = json.loads(path.read_text())
        settings, world = report["settings"], report["world"]
        lines += [f"### {report.get('device', 'CPU')} x {world}, {settings['nodes']} logical nodes x "
                  f"{world // settings['nodes']} (`{path.name}`)", "",
                  f"`python scripts/bench_online.py --device cuda --nodes {settings['nodes']} --traces DIR "
                  f"--step-tokens {settings['step_tokens']} --steps-before {settings['steps_before']} "
                  f"--steps-after {settings['steps_after']}` "
                  f"({settings['plan_trace']} -> {settings['serve_trace']}; {settings['step_tokens']} tokens per step "
                  f"over all ranks, {report['drift_step']} steps before the change, {settings['steps_after']} after; "
                  f"hidden {report['hidden']}, "
                  f"intermediate {report['inter']}, {report['dtype']}, {settings['mode']} exchange; window "
                  f"{settings['window_steps']} steps, check every {settings['interval']}, at most "
                  f"{settings['max_moves']} copies per online re-plan, {settings['chunk_mb']} MiB chunks). Step time: "
                  f"the trace's MoE layers of one step, slowest rank, median of "
                  f"{settings.get('repeats', 1)} passes. Error: max |out - ref| / max |ref| against a float32 dense "
                  "reference, at every check and every switch.", "",
                  "| policy | step ms before | after | settled | with transfer in flight | re-plans | copies moved "
                  "| GiB moved | transfer s (mean) | switch wait ms (mean) | planning s (mean) | max error |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for policy, result in report["policies"].items():
            s = result["summary"]
            flight = s["step_ms_with_transfer_in_flight"]
            lines.append(f"| {policy} | {s['step_ms_before_drift']:.2f} | {s['step_ms_after_drift']:.2f} | "
                         f"{s['step_ms_settled']:.2f} | {'-' if flight is None else f'{flight:.2f}'} | {s['replans']} | "
                         f"{s['copies_moved']} | {s['bytes_moved'] / 2**30:.2f} | {s['transfer_s_mean']:.3f} | "
                         f"{s['switch_wait_s_mean'] * 1e3:.1f} | {s['planning_s_mean']:.2f} | "
                         f"{result['max_relative_error']:.1e} |")
            axes[0, column].plot(result["step_ms"][1:], label=policy, linewidth=1)
        summary = {name: r["summary"] for name, r in report["policies"].items()}
        off, on, eplb = summary["grace-offline"], summary["grace-online"], summary["eplb-periodic"]
        lines += ["", f"Reading: settled, online GRACE takes {on['step_ms_settled'] / off['step_ms_settled']:.3f}x the "
                  f"offline plan's step time and {on['step_ms_settled'] / eplb['step_ms_settled']:.3f}x periodic EPLB's, "
                  f"moving {on['bytes_moved'] / max(eplb['bytes_moved'], 1):.3f}x its bytes. Before the change online "
                  f"and offline serve the same plan, so their gap there "
                  f"({abs(on['step_ms_before_drift'] / off['step_ms_before_drift'] - 1):.1%}) is this run's noise."]
        axes[0, column].axvline(report["drift_step"] - 1, color="grey", linestyle=":", linewidth=1)
        axes[0, column].set_title(f"{world} GPUs as {settings['nodes']} nodes: domain changes at the dotted line",
                                  fontsize=9)
        axes[0, column].set_xlabel("serving step")
        axes[0, column].set_ylabel("MoE time per step (ms)")
        axes[0, column].legend(fontsize=8)
        lines.append("")
    fig.tight_layout()
    fig.savefig(out / "online-replanning-gpu.png", dpi=110)
    return lines + ["![GPU step times](online-replanning-gpu.png)", ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    add_replanning_options(parser, step_tokens=1024, window_steps=16, sample_tokens=1024)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--replica-slots", type=int, default=1)
    parser.add_argument("--serve-tokens", type=int, default=65536, help="tokens of the other domain served")
    parser.add_argument("--plan-delay", type=int, default=2, help="steps from a check to posting its transfers")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--gpu", type=Path, nargs="*", default=None,
                        help="scripts/bench_online.py results to add (default: docs/bench-online-*.json)")
    parser.add_argument("--render", action="store_true", help="only re-render from the saved simulator JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "online-replanning.json"
    if args.render:
        data = json.loads(saved.read_text())
        results, seconds = data["results"], data["seconds"]
        for key, value in data["settings"].items():
            if key not in ("gpu", "render", "out", "shared"):
                setattr(args, key, value)
    else:
        routing = args.shared / "routing"
        arxiv = RoutingTrace.load(routing / "olmoe_arxiv.safetensors").topk_ids.long()
        wiki = RoutingTrace.load(routing / "olmoe_wikipedia.safetensors").topk_ids.long()
        cost = CostSettings()
        results = [scenario("arxiv -> wikipedia", arxiv, wiki, args, cost),
                   scenario("wikipedia -> arxiv", wiki, arxiv, args, cost)]
        seconds = time.perf_counter() - started
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("gpu", "render")}
        saved.write_text(json.dumps({"settings": settings, "run": run_record("cpu"), "seconds": seconds,
                                     "results": results}, indent=1) + "\n")
        plot(results, args.out / "online-replanning.png")
    gpu = args.gpu if args.gpu is not None else sorted(args.out.glob("bench-online-*.json"))
    report(results, args, args.out / "online-replanning.md", seconds, gpu_section(gpu, args.out))
    print((args.out / "online-replanning.md").read_text())


if __name__ == "__main__":
    main()
