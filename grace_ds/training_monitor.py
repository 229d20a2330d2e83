"""GRACE's figures of a training run in DeepSpeed's own monitors (W&B, TensorBoard, CSV, Comet).

When the DeepSpeed config enables a monitor, every `grace_moe.monitor_interval_steps` optimizer steps
the engine writes, beside DeepSpeed's Train/Samples/* events and on the same axis (samples):
  Train/Samples/grace_moe/forward_cross_node_MB_per_step  what a rank's forwards sent to GPUs of other
                                      nodes per optimizer step (token rows, results back, pair records),
                                      mean over the job's ranks; the backward sends the rows' gradients
                                      back the same ways
  Train/Samples/grace_moe/forward_same_node_MB_per_step   the same for GPUs of its own node
  Train/Samples/grace_moe/load_max_over_mean      (token, expert) pairs computed per rank, max over mean
The exchanges count what they send from the split sizes they hold anyway, by the cost model's byte
rules (GraceRuntime.count_traffic: no device synchronisation; the small split-size messages are not
counted); one all-reduce of 2 + world numbers per interval joins the ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.runtime import GraceRuntime

EVENTS = "Train/Samples/grace_moe/"


class TrainingMonitor:
    """Counts GRACE's traffic and load between intervals and writes them to `engine.monitor` (`after_step`), or
    hands them to a caller (`collect`: transformers' Trainer logs, grace_ds.transformers_trainer). Monitors of
    one engine do not disturb each other: each keeps its own starting counts. `last`: the latest interval's
    figures (also `pairs_per_rank_per_step`, which is not written)."""

    def __init__(self, engine, runtimes: list[GraceRuntime], interval_steps: int) -> None:
        self.engine, self.runtimes, self.interval_steps = engine, runtimes, interval_steps
        self.last: dict[str, float | list[float]] = {}
        for runtime in runtimes:
            runtime.count_traffic = True
        self._start()

    def _start(self) -> None:
        self.since_step, self.since_counts = self.engine.global_steps, self._counts()

    def _counts(self) -> torch.Tensor:
        """This rank's totals so far: [cross-node bytes, same-node bytes, then its pairs at its own index]."""
        world = dist.get_world_size() if faults.distributed() else 1
        rank = dist.get_rank() if faults.distributed() else 0
        counts = torch.zeros(2 + world, dtype=torch.float64)
        for runtime in self.runtimes:
            for traffic in runtime.traffic:
                counts[0] += traffic.cross_node_bytes
                counts[1] += traffic.intra_node_bytes
                counts[2 + rank] += traffic.pairs_computed
        return counts

    def after_step(self) -> None:
        """Call after each optimizer step on every rank (the interval's end is a collective)."""
        if self.engine.global_steps - self.since_step < self.interval_steps:
            return
        self.engine.monitor.write_events([(EVENTS + name, value, self.engine.global_samples)
                                          for name, value in self.collect().items() if not isinstance(value, list)])

    def collect(self) -> dict[str, float | list[float]]:
        """The figures since the last collect (or the start), per optimizer step; starts the next interval.
        Collective: every rank calls it at the same step."""
        counts, steps = self._counts(), max(1, self.engine.global_steps - self.since_step)
        interval = faults.all_reduced_on_host(counts - self.since_counts, "training monitor (GRACE's figures over ranks)")
        self.since_step, self.since_counts = self.engine.global_steps, counts
        world = interval.numel() - 2
        pairs = interval[2:] / steps
        self.last = {"forward_cross_node_MB_per_step": float(interval[0]) / world / steps / 1e6,
                     "forward_same_node_MB_per_step": float(interval[1]) / world / steps / 1e6,
                     "load_max_over_mean": float(pairs.max() / pairs.mean()) if pairs.sum() > 0 else 1.0,
                     "pairs_per_rank_per_step": pairs.tolist()}
        return self.last
