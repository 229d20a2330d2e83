"""Fault drill: 4 gloo ranks as 2 logical nodes x 2 serve a small GRACE layer; one rank stalls or dies
at each phase (profiling, plan loading, dispatch, combine) and the others must stop within the fault
timeout with an error naming that rank and the phase.

    python scripts/fault_drill.py [--timeout 2] [--json]

Used by tests/test_faults.py and scripts/reliability_report.py.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


from grace_ds import faults
from grace_ds.logical_nodes import free_port

PHASES = ("profiling", "plan loading", "dispatch", "combine")
WORLD, NODES, FAULTY = 4, 2, 2  # the faulty rank is not rank 0, whose host keeps the job's store
HIDDEN, EXPERTS, TOP_K = 8, 8, 2


def _setup(rank: int):
    from grace_ds.routing_stats import RoutingStats
    from grace_ds.runtime import GraceRuntime
    from grace_ds.planners import make_plan
    from grace_ds.routing_profile import RoutingProfile
    from grace_ds.topology import Topology

    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(64)]).view(64, 1, TOP_K)
    plan = make_plan("contiguous", RoutingProfile.from_topk_ids(ids, EXPERTS), Topology.uniform(NODES, WORLD // NODES))
    # Flat: dispatch (own rows computed meanwhile), the arrived rows' experts, combine: a fault in the
    # arrived rows' experts lands in the combine.
    runtime = GraceRuntime(plan, rank=rank, communication="flat")
    recorder = RoutingStats(1, EXPERTS, TOP_K)
    recorder.observe(0, ids[:16, 0])
    mine = ids[rank * 16:(rank + 1) * 16, 0]
    return plan, runtime, recorder, mine


def _act(phase: str, fault: str | None, rank: int, plan, runtime, recorder, ids, group, hold_s: float) -> None:
    """Run `phase` on this rank; the faulty rank stalls (sleeps hold_s) or dies where the others
    enter the phase (combine: inside its expert computation, after the dispatch)."""
    from grace_ds.plan_agreement import agree_on_plan

    def fail() -> None:
        if fault == "die":
            os._exit(1)
        time.sleep(hold_s)

    faulty = fault is not None and rank == FAULTY
    if faulty and phase != "combine":
        fail()
    if phase == "profiling":
        recorder.to_profile(group)
    elif phase == "plan loading":
        agree_on_plan(plan, "plan.json", group)
    else:
        calls = []

        def compute(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
            # The flat exchange computes this rank's own rows while the others cross (call 1), then the
            # rows that came in (call 2): failing there leaves every peer waiting in the combine.
            calls.append(1)
            if faulty and len(calls) == 2:
                fail()
            return rows * 2.0
        runtime.group = group
        hidden = torch.randn(ids.shape[0], HIDDEN)
        runtime.route_and_compute(0, hidden, ids, torch.full(ids.shape, 0.5), compute)


def _worker(rank: int, scenarios: list[dict], port: int, timeout_s: float, out_dir: str) -> None:
    os.environ.update(GRACE_HOSTNAME=f"node{rank // (WORLD // NODES)}", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    plan, runtime, recorder, ids = _setup(rank)
    # A job's first collectives (topology discovery, plan agreement) pay gloo's start-up once; do that
    # here so each scenario times the fault handling alone.
    dist.all_reduce(torch.zeros(1), group=faults.fault_group(timeout_s))
    dist.barrier()
    hold_s = timeout_s + 1.0  # past the others' timeout and roll call
    for index, scenario in enumerate(scenarios):
        group = faults.fault_group(timeout_s)
        started = time.monotonic()
        outcome = {"phase": scenario["phase"], "fault": scenario["fault"], "rank": rank}
        try:
            _act(scenario["phase"], scenario["fault"], rank, plan, runtime, recorder, ids, group, hold_s)
            outcome["error"] = None
        except faults.GraceDistributedError as error:
            outcome["error"] = str(error)
        outcome["seconds"] = time.monotonic() - started
        Path(out_dir, f"{index}_rank{rank}.json").write_text(json.dumps(outcome))
        if scenario["fault"] == "die":
            if rank == 0:  # hosts the job's store: stay until every survivor has finished its roll call
                others = [r for r in range(WORLD) if r not in (0, FAULTY)]
                # Leaves as soon as they have; the bound only guards a hang, so a loaded host's slow roll
                # call does not find the store gone (which would name no rank).
                deadline = time.monotonic() + 10 * timeout_s
                while time.monotonic() < deadline and not all(
                        Path(out_dir, f"{index}_rank{r}.json").exists() for r in others):
                    time.sleep(0.05)
            os._exit(0)  # the job is broken for good: leave without touching the default group
        dist.barrier()  # the stalled rank catches up before the next scenario
    dist.destroy_process_group()




def run(scenarios: list[dict], timeout_s: float) -> list[dict]:
    """Runs the scenarios in one job (a 'die' scenario must come last); every rank's outcome."""
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(_worker, args=(scenarios, free_port(), timeout_s, out), nprocs=WORLD,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + 60 + len(scenarios) * 4 * (timeout_s + 2)
        for process in context.processes:
            process.join(max(deadline - time.monotonic(), 1))
        for process in context.processes:
            if process.is_alive():
                process.kill()
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]


def drill(timeout_s: float = 3.0) -> list[dict]:
    """Every phase with a stalled rank (one job), then with a dying rank (a job each)."""
    outcomes = run([{"phase": p, "fault": "stall"} for p in PHASES], timeout_s)
    for phase in PHASES:
        outcomes += run([{"phase": phase, "fault": "die"}], timeout_s)
    return outcomes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=3.0, help="fault timeout in seconds")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    outcomes = drill(args.timeout)
    if args.json:
        print(json.dumps(outcomes, indent=1))
        return
    for o in outcomes:
        print(f"{o['fault']:<6} {o['phase']:<13} rank {o['rank']}: {o['seconds']:5.1f} s  {o['error']}")


if __name__ == "__main__":
    main()
