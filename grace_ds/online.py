"""Online re-planning while serving: watch the routing, and when it drifts from what the plan expects,
move a bounded number of expert copies and switch every rank to the new plan at one step boundary.

Per step (one model forward, `end_step`): the routing window advances. Every `interval_steps` steps
every rank sums the window over the job (one all-reduce); the job's first rank then, on a thread while
serving goes on, measures the drift against the served plan's predicted loads and, past
`drift_threshold` (or while the last re-plan ran out of moves), computes a bounded re-plan.
`plan_delay_steps` later every rank receives that plan (one broadcast: no rank needs bit-identical
planning), posts the weight transfers and keeps serving the old plan. At the next step boundary it waits
for the transfers and switches: weights, slots and routing tables change together, between two forwards,
on every rank at the same step. Outputs never change: only where experts run.
"""
from __future__ import annotations

import concurrent.futures
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from grace_ds import faults
from grace_ds.drift import drift_signal, measure_drift
from grace_ds.errors import GraceInputError
from grace_ds.expert_transfer import DEFAULT_CHUNK_BYTES, ExpertTransfer, schedule_transfers
from grace_ds.runtime import GraceRuntime
from grace_ds.plan import PlacementPlan
from grace_ds.plan_agreement import broadcast_plan
from grace_ds.planners import make_plan
from grace_ds.planners.assemble import base_slots
from grace_ds.planners.incremental import IncrementalResult, Move, align_plan, moved_copies, replan_incremental
from grace_ds.routing_profile import RoutingProfile
from grace_ds.routing_stats import RoutingStats


REPLAN_POLICIES = ("incremental", "eplb-periodic", "grace-periodic")


@dataclass(frozen=True)
class OnlineSettings:
    # incremental: GRACE's bounded moves when the drift passes the threshold; eplb-periodic / grace-periodic:
    # a plan from scratch at every check whatever the drift (SGLang / vLLM EPLB style), all its moves at once.
    policy: str = "incremental"
    window_steps: int = 64  # steps of routing the statistics cover
    window_buckets: int = 4  # the window slides by window_steps / window_buckets steps
    interval_steps: int = 16  # steps between drift checks
    plan_delay_steps: int = 2  # a check plans on a thread; its plan is taken up this many steps later
    drift_threshold: float = 0.05  # re-plan when some layer's max/mean GPU load grew this much over the plan's
    max_moves_per_step: int = 8  # expert copies moved per re-plan, summed over layers
    min_gain: float = 0.001  # a move must cut its layer's modeled time this much (relative) per copy
    sample_tokens: int = 1024  # top-k sets kept per layer and rank to score moves on
    transfer_chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.policy not in REPLAN_POLICIES:
            raise GraceInputError(f"online re-planning: policy must be one of {REPLAN_POLICIES}, got {self.policy!r}")
        for name in ("window_steps", "window_buckets", "interval_steps", "plan_delay_steps", "sample_tokens",
                     "transfer_chunk_bytes"):
            if getattr(self, name) < 1:
                raise GraceInputError(f"online re-planning: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_moves_per_step < 0 or self.drift_threshold < 0 or self.min_gain < 0:
            raise GraceInputError("online re-planning: max_moves_per_step, drift_threshold and min_gain must be >= 0")


@dataclass
class _Pending:
    plan: PlacementPlan
    moves: list[Move]
    transfer: ExpertTransfer
    record: dict
    posted_at: float


def decide_replan(plan: PlacementPlan, window: RoutingProfile, gpu_load: torch.Tensor, settings: OnlineSettings,
                  unfinished: bool, mode: str = "both") -> tuple[dict, IncrementalResult | None]:
    """The check every interval, on the window's profile and gpu_load [L, P] (pairs each GPU computed
    under `plan`): (a record of it, the re-plan or None). Incremental: a bounded re-plan when the drift
    passes the threshold or the last re-plan ran out of moves; periodic policies: a plan from scratch,
    renumbered to keep copies in place. Pure (the runtime runs it on the first rank only)."""
    drifts = measure_drift(plan, gpu_load)
    signal = drift_signal(drifts)
    record = {"drift": signal, "load_shift": max(d.load_shift for d in drifts),
              "observed_imbalance": max(d.observed_imbalance for d in drifts), "replanned": False,
              "moves": 0, "bytes_moved": 0}
    if settings.policy != "incremental":
        replica_slots = plan.slots_per_gpu - base_slots(plan.num_experts, plan.topology)
        fresh = align_plan(plan, make_plan(settings.policy.split("-")[0], window, plan.topology, replica_slots))
        moves = moved_copies(plan, fresh)
        record.update(replanned=True, moves=len(moves))
        return record, IncrementalResult(fresh, moves, [], [], False)
    if signal <= settings.drift_threshold and not unfinished:
        return record, None
    result = replan_incremental(plan, window, settings.max_moves_per_step, settings.min_gain, mode=mode)
    record.update(replanned=True, moves=len(result.moves), modeled_time_before_us=sum(result.cost_before),
                  modeled_time_after_us=sum(result.cost_after), budget_exhausted=result.budget_exhausted)
    return record, result


class OnlineReplanner:
    """Attach to a GraceRuntime whose layers registered their slot weights; call `end_step` after every
    forward (or `attach(model)` to do it from a forward hook). `history` keeps one record per check."""

    def __init__(self, runtime: GraceRuntime, settings: OnlineSettings | None = None, group=None,
                 transfer_group=None, log: Callable[[dict], None] | None = None) -> None:
        self.runtime, self.settings = runtime, settings or OnlineSettings()
        plan = runtime.plan
        missing = [layer for layer in range(plan.num_layers) if layer not in runtime.slot_modules]
        if missing:
            raise GraceInputError(f"online re-planning needs layers that hold their slots as SlotExperts "
                                  f"(transformers models converted by grace_ds, the megatron-core layer); plan "
                                  f"layers {missing} have none")
        self.group = group if group is not None else runtime.group
        self.transfer_group = transfer_group if transfer_group is not None else self.group
        s = self.settings
        self.window = RoutingStats(plan.num_layers, plan.num_experts, plan.top_k, runtime.device, plan.model_name,
                                   list(plan.layer_names), s.sample_tokens, s.window_steps, s.window_buckets,
                                   plan.num_gpus, plan.slots_per_gpu)
        runtime.observers.append(self._observe)
        self.log = log
        self.history: list[dict] = []
        self.step = 0
        self.pending: _Pending | None = None
        self._planning: tuple[concurrent.futures.Future, float, int] | None = None  # (future, started, due step)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._unfinished = False  # the first rank's: only it plans
        self._rank = faults.job_rank()
        self._handles: list = []

    def _observe(self, layer: int, top_k_index: torch.Tensor, slot_ids: torch.Tensor | None) -> None:
        """Counts a layer call's picks with the physical slots the served router gave them, so drift
        measures the loads the GPUs computed. A graphed call routes inside its graph: there the slots are
        peeked (the same router, its random draws left as they were)."""
        ids = top_k_index.detach().reshape(-1, top_k_index.shape[-1])
        if slot_ids is None:
            slot_ids = self.runtime.served.router.peek(layer, ids, self.runtime.rank)
        self.window.observe(layer, ids, slot_ids)

    def attach(self, model: nn.Module) -> "OnlineReplanner":
        """A forward hook on `model` that ends a step after each of its forwards."""
        self._handles.append(model.register_forward_hook(lambda module, inputs, output: self.end_step()))
        return self

    def detach(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._observe in self.runtime.observers:
            self.runtime.observers.remove(self._observe)

    def end_step(self) -> None:
        """A step boundary: switch a posted re-plan; post one whose planning is due; else check the drift
        every interval_steps steps."""
        self.window.end_step()
        self.step += 1
        if self.pending is not None:
            self._switch()
        elif self._planning is not None:
            if self.step >= self._planning[2]:
                self._post()
        elif self.step % self.settings.interval_steps == 0 and self.step >= self.settings.window_steps // 2:
            self._check()

    def _check(self) -> None:
        """Sum the window over ranks (a collective, here); the job's first rank plans on a thread while
        serving goes on, and every rank takes the plan up at a fixed later step."""
        runtime = self.runtime
        profile, gpu_load = self.window.totals(self.group)
        mode = runtime.comm_mode if runtime.plan.topology.num_nodes > 1 else "flat"
        started, step = time.perf_counter(), self.step

        def plan():
            record, result = decide_replan(runtime.plan, profile, gpu_load, self.settings, self._unfinished, mode)
            record.update(step=step, planning_s=time.perf_counter() - started)
            return record, result

        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._rank == 0:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grace-replan")
            future = self._executor.submit(plan)
        else:
            future.set_result(({"step": step, "planning_s": 0.0}, None))
        self._planning = (future, started, self.step + self.settings.plan_delay_steps)

    def _post(self) -> None:
        """Take up the planned change: the first rank's plan reaches every rank, whose weight transfers are
        posted now and switched at the next step."""
        future, started, _ = self._planning
        self._planning = None
        record, result = future.result()
        record["planning_wait_s"] = time.perf_counter() - started - record["planning_s"]
        runtime = self.runtime
        if self._rank == 0:
            self._unfinished = result is not None and result.budget_exhausted
        new_plan = broadcast_plan(result.plan if result is not None else None,
                                  f"online re-plan at step {self.step} (sharing the plan)", self.group)
        if new_plan is None:
            self._emit(record)
            return
        moves = moved_copies(runtime.plan, new_plan)
        record.update(replanned=True, moves=len(moves))
        transfers = schedule_transfers(runtime.plan, moves)
        transfer = ExpertTransfer(transfers, runtime.rank, runtime.plan, runtime.slot_modules, self.transfer_group,
                                  self.settings.transfer_chunk_bytes).start()
        self.pending = _Pending(new_plan, moves, transfer, record, time.perf_counter())

    def _switch(self) -> None:
        pending, self.pending = self.pending, None
        waited = time.perf_counter()
        arrived = pending.transfer.wait()
        self.runtime.switch_plan(pending.plan, arrived)
        self.window.forget_gpu_loads()
        record = pending.record
        sent, received = pending.transfer.bytes_sent, pending.transfer.bytes_received
        record.update(switch_step=self.step, transfer_wait_s=time.perf_counter() - waited,
                      transfer_s=time.perf_counter() - pending.posted_at, bytes_sent_here=sent,
                      bytes_received_here=received)
        record["bytes_moved"] = sum(_copy_bytes(self.runtime, m.layer) for m in pending.moves)
        self._emit(record)

    def _emit(self, record: dict) -> None:
        self.history.append(record)
        if self.log is not None:
            self.log(record)


def _copy_bytes(runtime: GraceRuntime, layer: int) -> int:
    """Bytes of one expert copy of `layer` (gate_up [2I, H] and down [H, I])."""
    module = runtime.slot_modules[layer]
    per_copy = math.prod(module.gate_up_proj.shape[1:]) + math.prod(module.down_proj.shape[1:])
    return int(per_copy * module.gate_up_proj.element_size())
