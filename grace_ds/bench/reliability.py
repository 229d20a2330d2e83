"""Writes docs/reliability.md: what bad input the loaders and the CLI were fed, and what happened.

1. Every loader gets N mutated copies of a valid file (random byte edits, truncation) and N random byte
   strings; each outcome is counted: loaded (the mutation kept it valid), refused with GraceInputError
   naming the file, or any other exception (a bug).
2. The CLI gets a list of named bad inputs; exit code, whether a traceback appeared, whether an output
   file was left behind.
3. Distributed faults (scripts/fault_drill.py): 4 gloo ranks as 2 nodes x 2, one rank stalls or dies at
   each phase; what every other rank reported and when.
Usage: python scripts/reliability_report.py [--n 300] [--fault-timeout 3]
(it runs this module from the repository root: the loader fuzzing reuses the test suite's files, tests/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from grace_ds.bench import fault_drill
from grace_ds.bench.provenance import ROOT


def fuzz_loaders(n: int, work: Path) -> list[tuple[str, Counter]]:
    from grace_ds.errors import GraceInputError
    from tests.test_loader_fuzz import LOADERS, _valid_files

    _valid_files(work)
    rng = random.Random(0)
    rows = []
    for name, load in sorted(LOADERS.items()):
        original = (work / name).read_bytes()
        outcomes: Counter = Counter()
        for i in range(2 * n):
            data = bytearray(original)
            if i < n:  # mutated
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                if rng.random() < 0.5:
                    data = data[: rng.randrange(len(data) + 1)]
            else:  # random
                data = bytearray(rng.randbytes(rng.randint(0, 400)))
            path = work / f"fuzz_{name}"
            path.write_bytes(bytes(data))
            try:
                load(path)
                outcomes["loaded"] += 1
            except GraceInputError:
                outcomes["refused with GraceInputError"] += 1
            except Exception as error:  # noqa: BLE001 - counting what escapes is the point
                outcomes[f"other: {type(error).__name__}"] += 1
        rows.append((name, outcomes))
    return rows


def cli_cases(work: Path) -> list[tuple[str, int, bool, bool]]:
    import torch

    from grace_ds.routing_profile import RoutingProfile
    from tests.conftest import tiny_trace

    RoutingProfile.from_topk_ids(tiny_trace(tokens=40), 8).save(work / "ok.safetensors")
    (work / "nan.json").write_text('{"logical_count": [[1, NaN, 2]]}')
    (work / "zero.json").write_text('{"logical_count": [[0, 0, 0]]}')
    (work / "trunc.safetensors").write_bytes((work / "ok.safetensors").read_bytes()[:60])
    subprocess.run([sys.executable, "-m", "grace_ds.cli", "plan", "--profile", str(work / "ok.safetensors"),
                    "--nodes", "1", "--gpus-per-node", "2", "--policy", "eplb", "--out", str(work / "plan.json")],
                   check=True, capture_output=True)
    trace16 = work / "trace16.safetensors"
    from grace_ds.trace import RoutingTrace

    RoutingTrace(torch.randint(0, 16, (20, 2, 1)), 16, ["a", "b"]).save(trace16)
    cases = [
        ("profile file missing", ["plan", "--profile", str(work / "missing.safetensors"), "--out", str(work / "o1.json")], "o1.json"),
        ("profile file truncated", ["plan", "--profile", str(work / "trunc.safetensors"), "--out", str(work / "o2.json")], "o2.json"),
        ("loads with NaN", ["profile-load", str(work / "nan.json"), "--out", str(work / "o3.safetensors")], "o3.safetensors"),
        ("loads all zero", ["profile-load", str(work / "zero.json"), "--out", str(work / "o4.safetensors")], "o4.safetensors"),
        ("plan for 8 experts, trace of 16", ["simulate", "--plan", str(work / "plan.json"), "--trace", str(trace16)], None),
        ("negative replica budget", ["plan", "--profile", str(work / "ok.safetensors"), "--replica-slots", "-1",
                                     "--out", str(work / "o5.json")], "o5.json"),
        ("token range selecting nothing", ["profile-trace", str(trace16), "--tokens", "100:200", "--out",
                                           str(work / "o6.safetensors")], "o6.safetensors"),
    ]
    rows = []
    for name, args, output in cases:
        done = subprocess.run([sys.executable, "-m", "grace_ds.cli", *args], capture_output=True, text=True)
        left = output is not None and (work / output).exists()
        message = done.stderr.replace(str(work), "<tmp>").strip().splitlines()[-1:]
        rows.append((name, done.returncode, "Traceback" in done.stderr, left, message))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="mutated and random inputs per loader (each)")
    parser.add_argument("--fault-timeout", type=float, default=3.0, help="fault timeout of the drill, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fuzz = fuzz_loaders(args.n, Path(tmp))
        cli = cli_cases(Path(tmp))
    drill = fault_drill.drill(args.fault_timeout)
    lines = ["# Reliability: bad input and distributed faults", "",
             f"Produced by `python scripts/reliability_report.py --n {args.n} --fault-timeout {args.fault_timeout:g}` "
             f"on {datetime.date.today()}.", "",
             f"## Loaders: {args.n} mutated copies of a valid file and {args.n} random byte strings each", "",
             "| file | outcomes |", "|---|---|"]
    for name, outcomes in fuzz:
        lines.append(f"| {name} | " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())) + " |")
    lines += ["", "## CLI", "", "| input | exit code | traceback | output left behind | message |", "|---|---|---|---|---|"]
    for name, code, traceback, left, message in cli:
        text = message[0].replace("|", "/") if message else ""
        lines.append(f"| {name} | {code} | {'yes' if traceback else 'no'} | {'yes' if left else 'no'} | {text} |")
    lines += ["", f"## Distributed faults: rank {fault_drill.FAULTY} of 4 (2 nodes x 2, gloo) stalls or dies at each "
              f"phase; fault timeout {args.fault_timeout:g} s", "",
              "A stalled rank sleeps past the others' timeout; a dying one exits at once (in the combine case: "
              "inside its expert computation, after the dispatch). Seconds: from entering the phase to the error.",
              "", "| fault | phase | rank | stopped after | message (cause trimmed) |", "|---|---|---|---:|---|"]
    for o in drill:
        text = (o["error"] or "no error").split(" Cause here:")[0].replace("|", "/")
        lines.append(f"| {o['fault']} | {o['phase']} | {o['rank']} | {o['seconds']:.1f} s | {text} |")
    lines += ["", "On NCCL a timed-out collective is also caught by NCCL's own watchdog, which may end the process "
              "with its own message before the roll call; the drill runs on gloo."]
    out = ROOT / "docs" / "reliability.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    escaped = sum(v for _, o in fuzz for k, v in o.items() if k.startswith("other"))
    print(json.dumps({"escaped_exceptions": escaped}))


if __name__ == "__main__":
    main()
