"""What the two online re-planning benchmarks share: the policies they compare, their re-planning options
and the OnlineSettings those give (grace_ds.bench.online on devices, grace_ds.bench.online_replanning in
the simulator)."""
from __future__ import annotations

import argparse

import torch

from grace_ds.online import OnlineSettings

# A policy's label -> grace_ds.online's policy (None: the offline plan, never re-planned).
POLICY_KINDS = {"grace-offline": None, "grace-online": "incremental", "grace-periodic": "grace-periodic",
                "eplb-periodic": "eplb-periodic"}


def first_plan_policy(label: str) -> str:
    """The planner of a policy's initial plan: EPLB's for the periodic EPLB baseline, GRACE otherwise."""
    return "eplb" if label == "eplb-periodic" else "grace"


def add_replanning_options(parser: argparse.ArgumentParser, step_tokens: int, window_steps: int,
                           sample_tokens: int) -> None:
    """The layout and re-planning options both benchmarks take (their defaults differ by what they run)."""
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--step-tokens", type=int, default=step_tokens, help="tokens per step over all ranks")
    parser.add_argument("--window-steps", type=int, default=window_steps)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--drift-threshold", type=float, default=0.05)
    parser.add_argument("--max-moves", type=int, default=16)
    parser.add_argument("--sample-tokens", type=int, default=sample_tokens, help="per rank")
    parser.add_argument("--mode", choices=("flat", "hierarchical"), default="hierarchical")


def online_settings(label: str, args: argparse.Namespace, **extra) -> OnlineSettings:
    """OnlineSettings of policy `label` from the options of add_replanning_options (grace-offline: the
    incremental policy's, which it never acts on)."""
    return OnlineSettings(policy=POLICY_KINDS[label] or "incremental", window_steps=args.window_steps,
                          window_buckets=4, interval_steps=args.interval, drift_threshold=args.drift_threshold,
                          max_moves_per_step=args.max_moves, sample_tokens=args.sample_tokens, **extra)


def cycled(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` tokens of `tokens` repeated end to end."""
    repeats = -(-count // tokens.shape[0])
    return tokens.repeat(repeats, *([1] * (tokens.dim() - 1)))[:count]
