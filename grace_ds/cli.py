"""`grace-ds`: thin commands over the library. Bad input -> one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from grace_ds.errors import GraceInputError


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, disable=None, leave=False)


def _topology(args):
    from grace_ds.topology import LinkModel, Topology

    links = LinkModel(inter_node_bandwidth_Gbps=args.inter_node_gbps)
    if args.gpus_per_node_list:
        return Topology(tuple(int(x) for x in args.gpus_per_node_list.split(",")), links)
    return Topology.uniform(args.nodes, args.gpus_per_node, links)


def cmd_profile_trace(args) -> None:
    from grace_ds.routing_profile import RoutingProfile
    from grace_ds.trace import RoutingTrace, parse_token_range

    trace = RoutingTrace.load(args.trace).tokens(parse_token_range(args.tokens))
    profile = RoutingProfile.from_topk_ids(trace.topk_ids, trace.num_experts, trace.model_name, trace.layer_names)
    profile.save(args.out)
    print(f"profile of {trace.num_tokens} tokens, {profile.num_layers} layers x {profile.num_experts} experts "
          f"(top-{profile.top_k}) -> {args.out}")


def cmd_profile(args) -> None:
    from grace_ds.profiling import encode_text, load_model, profile_model

    if not args.data.is_file():
        raise GraceInputError(f"{args.data}: no such text file")
    model, tokenizer = load_model(args.model)
    ids = encode_text(args.data.read_text(encoding="utf-8", errors="replace"), tokenizer, model.config.vocab_size)
    profile = profile_model(model, ids, args.sequence_length, args.batch_size, args.max_tokens,
                            sample_tokens=ids.numel() if args.trace_out else None)
    if args.trace_out:
        from grace_ds.routing_profile import DEFAULT_SAMPLE_TOKENS
        from grace_ds.trace import RoutingTrace

        trace = RoutingTrace(profile.sample_topk_ids, profile.num_experts, profile.layer_names, profile.model_name)
        trace.save(args.trace_out)
        print(f"routing trace of {trace.num_tokens} tokens -> {args.trace_out}")
        profile.sample_topk_ids = profile.sample_topk_ids[:DEFAULT_SAMPLE_TOKENS].clone()
    profile.save(args.out)
    print(f"profile of {int(profile.num_tokens[0])} tokens, {profile.num_layers} MoE layers x "
          f"{profile.num_experts} experts (top-{profile.top_k}) -> {args.out}")


def cmd_profile_load(args) -> None:
    from grace_ds.routing_profile import RoutingProfile

    profile = RoutingProfile.from_logical_counts(args.loads, args.top_k)
    profile.save(args.out)
    print(f"load-only profile, {profile.num_layers} MoE layers x {profile.num_experts} experts -> {args.out}")


def cmd_plan(args) -> None:
    from grace_ds.planners import GraceSettings, make_plan
    from grace_ds.routing_profile import RoutingProfile

    import torch

    if args.workers < 1:
        raise GraceInputError(f"--workers must be >= 1, got {args.workers}")
    # Planning is many small tensor ops: extra threads only add synchronisation (measured ~20% slower).
    torch.set_num_threads(1)
    profile = RoutingProfile.load(args.profile)
    topology = _topology(args)
    options = {}
    if args.policy == "grace":
        settings = None
        if args.r is not None or args.paper:
            mode = "spectral" if args.paper else "balanced"
            settings = (GraceSettings(node_grouping=mode, gpu_grouping=mode, r=args.r, replication="paper",
                                      max_rounds=1, receivers="least-loaded") if args.paper
                        else GraceSettings(r=args.r))
        options = {"settings": settings, "tune": not args.no_tune, "workers": args.workers, "objective": args.objective}
        if args.balance_limit is not None:
            options["balance_limit"] = args.balance_limit
    elif args.r is not None or args.paper or args.no_tune or args.objective != "time" or args.balance_limit is not None:
        raise GraceInputError("--r, --paper, --no-tune, --objective and --balance-limit apply to --policy grace only")
    bar = _progress(profile.num_layers, f"planning ({args.policy})") if args.policy == "grace" else None
    if bar is not None:
        options["progress"] = bar
    plan = make_plan(args.policy, profile, topology, args.replica_slots, **options)
    if bar is not None:
        bar.close()
    if profile.sample_topk_ids is not None:
        from grace_ds.simulate import MODE_SAMPLE_TOKENS, modeled_times_by_mode

        plan.options["modeled_layer_time_us"] = modeled_times_by_mode(plan, profile.sample_topk_ids[:MODE_SAMPLE_TOKENS])
    plan.save(args.out)
    load = plan.predicted_gpu_load
    ratio = float((load.max(1).values / load.mean(1)).mean())
    print(f"{args.policy} plan for {topology.describe()}, {plan.slots_per_gpu} slots per GPU, "
          f"predicted max/mean GPU load {ratio:.3f} -> {args.out}")


def cmd_simulate(args) -> None:
    from grace_ds.plan import PlacementPlan
    from grace_ds.cost import COST_MODEL_EXPLANATION, CostSettings
    from grace_ds.simulate import simulate_loads, simulate_trace, summarize

    if args.explain:
        print(COST_MODEL_EXPLANATION)
        if args.plan is None:
            return
    if args.plan is None or (args.trace is None) == (args.loads is None):
        raise GraceInputError("simulate needs --plan and exactly one of --trace or --loads")
    plan = PlacementPlan.load(args.plan)
    if args.nodes is not None or args.gpus_per_node is not None:
        from grace_ds.topology import Topology

        asked = Topology.uniform(args.nodes or plan.topology.num_nodes,
                                 args.gpus_per_node or plan.topology.gpus_per_node[0])
        if asked.gpus_per_node != plan.topology.gpus_per_node:
            raise GraceInputError(f"{args.plan}: plan is for {plan.topology.describe()}, asked for {asked.describe()} "
                                  f"(plan again with --nodes {asked.num_nodes} --gpus-per-node {asked.gpus_per_node[0]})")
    if args.loads is not None:
        from grace_ds.routing_profile import RoutingProfile

        profile = RoutingProfile.from_logical_counts(args.loads, plan.top_k)
        plan.check_matches(profile.num_experts, profile.num_layers, None, None, str(args.plan))
        layers = simulate_loads(plan, profile, args.router)
        summary = {"max_over_mean_gpu_load": sum(r["max_over_mean_gpu_load"] for r in layers) / len(layers)}
        result = {"plan": str(args.plan), "router": args.router, **summary, "layers": layers}
    else:
        from grace_ds.trace import RoutingTrace, parse_token_range

        trace = RoutingTrace.load(args.trace).tokens(parse_token_range(args.tokens))
        plan.check_matches(trace.num_experts, trace.topk_ids.shape[1], trace.top_k, None, str(args.plan))
        cost = CostSettings(hidden=args.hidden, ffn_hidden=args.ffn_hidden, dtype_bytes=args.dtype_bytes)
        layers = simulate_trace(plan, trace.topk_ids, args.router, cost)
        result = {"plan": str(args.plan), "router": args.router, "tokens": trace.num_tokens, **summarize(layers),
                  "layers": [asdict(m) for m in layers]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"plan {args.plan} ({plan.policy}, {plan.topology.describe()}), router {args.router}; "
          f"figures per MoE layer, averaged over layers")
    for key, value in result.items():
        if key not in ("layers", "plan", "router"):
            print(f"  {key:36s} {_figure(key, value)}")


def _figure(key: str, value) -> str:
    """A simulate figure with its unit: bytes as whole bytes (and MiB), times in us, ratios as they are."""
    if not isinstance(value, float):
        return f"{value:,}" if isinstance(value, int) else str(value)
    if key.endswith("_bytes") or "_bytes_" in key:
        return f"{round(value):,} B ({value / 2**20:,.1f} MiB)"
    if key.endswith("_us") or "_us_" in key:
        return f"{value:,.1f} us"
    return f"{value:,.3f}"


def cmd_evaluate(args) -> None:
    from grace_ds.evaluation import evaluate_policies, format_table

    rows = evaluate_policies(args.trace, [int(x) for x in args.nodes_list.split(",")],
                             [int(x) for x in args.gpus_list.split(",")], args.replica_slots,
                             test_trace=args.test_trace, show_progress=True)
    print(format_table(rows))
    if args.json_out:
        from grace_ds.files import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(rows, indent=1) + "\n")
        print(f"rows -> {args.json_out}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default shown (the help says what an unset optional one means); examples (the
    epilogs) keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


EXAMPLES = {
    "profile-trace": "grace-ds profile-trace ../shared/data/routing/mixtral_arxiv.safetensors --tokens :8192 "
                     "--out profile.safetensors",
    "profile": "grace-ds profile --model grace_ds/examples/default_model --data outputs/heldout.txt --max-tokens 65536 "
               "--sequence-length 128 --out profile.safetensors",
    "profile-load": "grace-ds profile-load ../shared/data/expert_load/deepseek_v3/decode_in1000out1000.json "
                    "--top-k 8 --out profile.safetensors",
    "plan": "grace-ds plan --profile profile.safetensors --nodes 2 --gpus-per-node 2 --policy grace --out plan.json",
    "simulate": "grace-ds simulate --plan plan.json --trace ../shared/data/routing/mixtral_arxiv.safetensors "
                "--tokens 8192:16384 --nodes 2 --gpus-per-node 2",
    "checkpoint-to-deepspeed": "grace-ds checkpoint-to-deepspeed ckpt/global_step100 --out ds_ckpt/global_step100",
    "checkpoint-info": "grace-ds checkpoint-info ckpt/global_step100 --plan plan_grace.json",
    "weights": "grace-ds weights --model grace_ds/examples/default_model --plan outputs/plan_grace.json",
    "evaluate": "grace-ds evaluate --trace ../shared/data/routing/mixtral_arxiv.safetensors --nodes-list 2,4 "
                "--gpus-list 2 --json-out rows.json",
}


def cmd_checkpoint_to_deepspeed(args) -> None:
    from grace_ds.deepspeed_checkpoint import export_deepspeed_checkpoint

    written = export_deepspeed_checkpoint(args.checkpoint, args.out)
    print(f"{len(written)} files in DeepSpeed MoE's layout -> {args.out} (load with load_optimizer_states=False)")


def cmd_checkpoint_info(args) -> None:
    from grace_ds.checkpoint_layout import describe_checkpoint
    from grace_ds.plan import PlacementPlan

    print("\n".join(describe_checkpoint(args.checkpoint, PlacementPlan.load(args.plan) if args.plan else None)))


def cmd_weights(args) -> None:
    from grace_ds.models.rank_load import weights_per_gpu
    from grace_ds.plan import PlacementPlan

    plan = PlacementPlan.load(args.plan)
    shares = weights_per_gpu(args.model, plan)
    mib = 2 ** 20
    total = shares[0].read_bytes + shares[0].skipped_expert_bytes
    print(f"{args.model}: {total / mib:,.1f} MiB of weights ({shares[0].dense_bytes / mib:,.1f} MiB dense, on every GPU); "
          f"each GPU of the plan ({plan.topology.describe()}) reads:")
    for gpu, share in enumerate(shares):
        copies = int((plan.slot_expert[:, gpu] >= 0).sum())
        print(f"  GPU {gpu} (node {int(plan.topology.node_of_gpu[gpu])}): {share.read_bytes / mib:,.1f} MiB "
              f"(experts {share.expert_bytes / mib:,.1f} MiB: {copies} expert copies over {plan.num_layers} layers)")
    largest = max(range(len(shares)), key=lambda g: shares[g].read_bytes)
    print(f"largest: GPU {largest}, {shares[largest].read_bytes / mib:,.1f} MiB (the whole checkpoint is "
          f"{total / shares[largest].read_bytes:.2f}x that; bytes as stored, activations and KV cache come on top)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grace-ds", description="GRACE-MoE expert placement for DeepSpeed",
                                     formatter_class=_HelpFormatter,
                                     epilog="example (a plan from a trace, then its cost):\n  "
                                            + "\n  ".join(EXAMPLES[c] for c in ("profile-trace", "plan", "simulate")))
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class _Sub:  # every subcommand with the shared formatter and its example
        @staticmethod
        def add_parser(name: str, **kwargs):
            return subparsers.add_parser(name, formatter_class=_HelpFormatter, description=kwargs.get("help"),
                                         epilog=f"example:\n  {EXAMPLES[name]}", **kwargs)

    sub = _Sub()

    p = sub.add_parser("profile-trace", help="routing profile from a per-token top-k trace (safetensors)")
    p.add_argument("trace", type=Path, help="per-token top-k trace (safetensors, [T, L, k])")
    p.add_argument("--tokens", help="token range A:B of the trace to use (none: all)")
    p.add_argument("--out", type=Path, required=True, help="profile file to write (its folder must exist)")
    p.set_defaults(func=cmd_profile_trace)

    p = sub.add_parser("profile", help="routing profile of a transformers MoE model on a text file")
    p.add_argument("--model", type=Path, required=True, help="transformers checkpoint directory")
    p.add_argument("--data", type=Path, required=True, help="UTF-8 text file")
    p.add_argument("--max-tokens", type=int, help="profile at most this many tokens of the text (none: all)")
    p.add_argument("--sequence-length", type=int, default=256, help="tokens per sequence fed to the model")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward")
    p.add_argument("--out", type=Path, required=True, help="profile file to write (its folder must exist)")
    p.add_argument("--trace-out", type=Path, help="also write every token's top-k ([T, L, k] routing trace)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("profile-load", help="load-only profile from a {'logical_count': [[...]]} JSON")
    p.add_argument("loads", type=Path, help="JSON with logical_count [L][E] (tokens per expert per layer)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token of the model (8: DeepSeek-V3)")
    p.add_argument("--out", type=Path, required=True, help="profile file to write (its folder must exist)")
    p.set_defaults(func=cmd_profile_load)

    def add_topology(p):
        p.add_argument("--nodes", type=int, default=2, help="nodes of the job")
        p.add_argument("--gpus-per-node", type=int, default=2, help="GPUs (ranks) per node")
        p.add_argument("--gpus-per-node-list", help="uneven nodes, e.g. 4,2 (overrides --nodes/--gpus-per-node)")
        p.add_argument("--inter-node-gbps", type=float, default=25.0, help="cross-node link, Gbit/s per node")

    from grace_ds.planners import POLICIES

    p = sub.add_parser("plan", help="placement plan from a profile")
    p.add_argument("--profile", type=Path, required=True, help="routing profile (grace-ds profile*)")
    add_topology(p)
    p.add_argument("--policy", choices=POLICIES, default="grace", help="placement planner")
    p.add_argument("--replica-slots", type=int, default=1, help="extra expert copies per GPU per layer")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="grace: plan layers in this many processes (one per CPU here; the result is the same)")
    p.add_argument("--r", type=float, help="grace: GPU-group size ratio r (none: the knee of S(r) vs U(r))")
    p.add_argument("--paper", action="store_true", help="grace: the paper's spectral grouping, one replication round")
    p.add_argument("--no-tune", action="store_true", help="grace: do not score candidate settings on the profile")
    p.add_argument("--objective", choices=("time", "copies"), default="time",
                   help="grace: what the tuner minimises on the profile's sampled routings: the modeled layer "
                        "time (flat + hierarchical), or GPU copies per token")
    p.add_argument("--balance-limit", type=float,
                   help="grace: the tuner keeps settings whose max/mean GPU load on the sample stays within this "
                        "(none: 1.12)")
    p.add_argument("--out", type=Path, required=True, help="plan file to write (JSON; its folder must exist)")
    p.set_defaults(func=cmd_plan)

    from grace_ds.routing import ROUTER_POLICIES

    p = sub.add_parser("simulate", help="replay a trace (or loads) under a plan: traffic, balance, modeled time")
    p.add_argument("--plan", type=Path, help="placement plan (grace-ds plan)")
    p.add_argument("--trace", type=Path, help="per-token top-k trace to replay (safetensors)")
    p.add_argument("--loads", type=Path, help="load-only JSON: balance metrics only")
    p.add_argument("--tokens", help="token range A:B of the trace (none: all)")
    p.add_argument("--nodes", type=int, help="refuse the plan unless it is for this many nodes (none: the plan's)")
    p.add_argument("--gpus-per-node", type=int, help="refuse the plan unless it has this many GPUs per node (none: the plan's)")
    p.add_argument("--router", choices=ROUTER_POLICIES, default="tar", help="replica router")
    p.add_argument("--hidden", type=int, default=2048, help="model hidden size (bytes per token row)")
    p.add_argument("--ffn-hidden", type=int, default=1024, help="expert intermediate size (for GEMM time)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per activation element (2: bf16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--explain", action="store_true", help="print the cost model's formula")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("evaluate", help="every policy on a trace: plan on the first half, replay the second")
    p.add_argument("--trace", type=Path, required=True, help="per-token top-k trace (safetensors)")
    p.add_argument("--test-trace", type=Path, help="replay this trace instead (plan on one domain, run another)")
    p.add_argument("--nodes-list", default="2", help="comma-separated node counts to evaluate")
    p.add_argument("--gpus-list", default="2", help="comma-separated GPUs per node to evaluate")
    p.add_argument("--replica-slots", type=int, default=1, help="extra expert copies per GPU per layer")
    p.add_argument("--json-out", type=Path, help="also write the rows as JSON (its folder must exist)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("checkpoint-to-deepspeed",
                       help="a GRACE layers' DeepSpeed checkpoint in DeepSpeed MoE's own layout (a file per expert)")
    p.add_argument("checkpoint", type=Path, help="tag folder of a checkpoint saved by a grace_ds engine")
    p.add_argument("--out", type=Path, required=True,
                   help="tag folder to write (its parent must exist); load it with load_optimizer_states=False")
    p.set_defaults(func=cmd_checkpoint_to_deepspeed)

    p = sub.add_parser("checkpoint-info",
                       help="what a grace_ds engine's DeepSpeed checkpoint holds, and what loading it under a plan remaps")
    p.add_argument("checkpoint", type=Path, help="tag folder of a checkpoint saved by a grace_ds engine")
    p.add_argument("--plan", type=Path, help="a placement plan to load it under (none: describe only)")
    p.set_defaults(func=cmd_checkpoint_info)

    p = sub.add_parser("weights", help="what each GPU of a plan reads of a transformers checkpoint (its share of "
                                       "the weights), from the files' headers alone")
    p.add_argument("--model", type=Path, required=True, help="transformers checkpoint directory (safetensors)")
    p.add_argument("--plan", type=Path, required=True, help="placement plan (grace-ds plan)")
    p.set_defaults(func=cmd_weights)
    return parser


OUTPUT_OPTIONS = ("out", "trace_out", "json_out")


def _check_output_folders(args) -> None:
    """A typo in an output path should not create folders: the folder must exist."""
    for name in OUTPUT_OPTIONS:
        path = getattr(args, name, None)
        if path is not None and not path.parent.is_dir():
            raise GraceInputError(f"--{name.replace('_', '-')} {path}: no folder {path.parent} (create it first)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_output_folders(args)
        args.func(args)
    except GraceInputError as error:
        print(f"grace-ds: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
