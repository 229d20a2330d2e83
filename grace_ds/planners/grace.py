"""GRACE-MoE's planner: hierarchical grouping, dynamic replication, load prediction and copy weights.

Paper settings (`node_grouping="spectral"`, `gpu_grouping="spectral"`, r from the knee of S(r) vs U(r),
one replication round) are all available; by default the planner scores a few candidate settings per
layer on the profile's sampled token routings with grace_ds.cost's model and keeps the fastest.
"""
from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.planners.assemble import assemble_plan, layer_slot_tensors, predict_loads, slot_capacity
from grace_ds.planners.hierarchy import GROUPING_MODES, group_hierarchically
from grace_ds.planners.grouping import in_group_affinity_share
from grace_ds.planners.replication import RECEIVER_CHOICES, replicate_greedy, replicate_hot_experts
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology

REPLICATION_MODES = ("greedy", "paper")
R_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
DEFAULT_R = 0.15  # the paper's validated value, used when no knee shows


@dataclass(frozen=True)
class GraceSettings:
    node_grouping: str = "balanced"
    gpu_grouping: str = "balanced"
    # The paper's r: how far a GPU group's size may stray from experts / GPUs (d = max(1, round(E * r)));
    # None: at the knee of size deviation S(r) vs intra-group affinity U(r).
    r: float | None = None
    load_slack: float = 0.05
    replication: str = "greedy"  # "paper": heaviest group's hot prefix per round; "greedy": best single copies
    max_rounds: int | None = None  # paper replication: None = while slots are free and it helps; 1 = the paper
    receivers: str = "spread-nodes"  # paper replication: receiver order

    def __post_init__(self) -> None:
        for name in ("node_grouping", "gpu_grouping"):
            if getattr(self, name) not in GROUPING_MODES:
                raise GraceInputError(f"grace planner: {name} must be one of {GROUPING_MODES}")
        if self.replication not in REPLICATION_MODES:
            raise GraceInputError(f"grace planner: replication must be one of {REPLICATION_MODES}")
        if self.receivers not in RECEIVER_CHOICES:
            raise GraceInputError(f"grace planner: receivers must be one of {RECEIVER_CHOICES}")
        if self.r is not None and not 0.0 <= self.r <= 1.0:
            raise GraceInputError(f"grace planner: r must lie in [0, 1], got {self.r}")


def knee_r(affinity: torch.Tensor | None, load: torch.Tensor, topology: Topology, capacity: int,
           settings: GraceSettings, seed: int = 0) -> float:
    """The ratio r at the knee of intra-GPU affinity share U(r) against size deviation S(r)."""
    if affinity is None or float(affinity.sum()) <= 0:
        return DEFAULT_R
    from kneed import KneeLocator

    deviation, utilisation = [], []
    mean_size = load.shape[0] / topology.num_gpus
    for r in R_GRID:
        groups = group_hierarchically(affinity, load, topology, capacity, settings.node_grouping, "spectral", r,
                                      settings.load_slack, seed)
        labels = torch.empty(load.shape[0], dtype=torch.int64)
        for gpu, members in enumerate(groups):
            labels[members] = gpu
        deviation.append(sum(abs(len(g) - mean_size) for g in groups) / (len(groups) * mean_size))
        utilisation.append(in_group_affinity_share(labels, affinity))
    points = sorted(set(zip(deviation, utilisation, R_GRID)))
    xs = [p[0] for p in points]
    if len(set(xs)) < 3:
        return DEFAULT_R
    knee = KneeLocator(xs, [p[1] for p in points], curve="concave", direction="increasing").knee
    if knee is None:
        return DEFAULT_R
    return min(p[2] for p in points if p[0] == knee)


def place_layer(affinity: torch.Tensor | None, load: torch.Tensor, topology: Topology, capacity: int,
                settings: GraceSettings, seed: int = 0,
                sample_topk_ids: torch.Tensor | None = None,
                grouping_cache: dict | None = None) -> tuple[list[list[int]], list[list[bool]], float]:
    """One layer: (copies per GPU, primary flags, r used). `grouping_cache` shares groupings between
    candidate settings of one layer that differ only in replication."""
    r = settings.r
    if r is None:  # the knee matters where r shapes the clusters; for balanced groups it only bounds sizes
        r = knee_r(affinity, load, topology, capacity, settings, seed) if settings.gpu_grouping == "spectral" else DEFAULT_R
    key = (settings.node_grouping, settings.gpu_grouping, r, settings.load_slack)
    if grouping_cache is not None and key in grouping_cache:
        primaries = grouping_cache[key]
    else:
        primaries = group_hierarchically(affinity, load, topology, capacity, settings.node_grouping,
                                         settings.gpu_grouping, r, settings.load_slack, seed, sample_topk_ids)
        if grouping_cache is not None:
            grouping_cache[key] = primaries
    if settings.replication == "greedy":
        lists, primary = replicate_greedy(primaries, load, topology, capacity)
    else:
        lists, primary = replicate_hot_experts(primaries, load, topology, capacity, settings.max_rounds,
                                               settings.receivers)
    return lists, primary, r


def candidate_settings() -> list[GraceSettings]:
    """What the tuner tries per layer: the paper's settings, and ours at several load slacks."""
    found = [GraceSettings(node_grouping="spectral", gpu_grouping="spectral", replication="paper", max_rounds=1,
                           receivers="least-loaded"),
             GraceSettings(node_grouping="spectral", gpu_grouping="spectral")]
    found += [GraceSettings(load_slack=slack) for slack in (0.05, 0.1, 0.15, 0.2, 0.3)]
    return found


SCORE_MODES = ("both", "flat", "hierarchical", "copies")
OBJECTIVES = {"time": "both", "copies": "copies"}  # what the tuner minimises -> score_layer's mode


def score_layer(lists: list[list[int]], primary: list[list[bool]], load: torch.Tensor, sample: torch.Tensor,
                topology: Topology, capacity: int, num_experts: int, top_k: int,
                mode: str = "both", sampling: str = "swrr") -> tuple[float, float]:
    """(cost, max/mean GPU load) of one layer placement on sampled top-k sets [S, k]. The cost is the
    modeled layer time of `mode`, or hierarchical plus flat ("both") where a job may run either, or GPU
    copies per token ("copies"). `sampling="random"` routes by seeded draws (the same in expectation, no
    schedules to build: for many quick scores)."""
    from grace_ds.cost import CostSettings, flat_hops, layer_times_us, pairs_per_gpu
    from grace_ds.routing import ReplicaRouter
    from grace_ds.simulate import token_gpus

    weights, predicted = predict_loads(load, lists, topology)
    slot_expert, slot_primary, slot_weight = layer_slot_tensors(lists, primary, weights, capacity)
    plan = PlacementPlan(slot_expert[None], slot_primary[None], slot_weight[None], predicted.view(1, -1), topology,
                         num_experts, top_k, "grace-candidate", ["candidate"])
    sources = token_gpus(sample.shape[0], topology.num_gpus)
    slots = ReplicaRouter(plan, "tar", sampling=sampling).route(0, sample, sources)
    dest_gpu = slots // capacity
    pairs = pairs_per_gpu(dest_gpu, topology.num_gpus)
    balance = float(pairs.max() / pairs.mean())
    if mode == "copies":  # GPU copies per token: rows the flat exchange sends
        return float(flat_hops(dest_gpu, sources, topology.num_gpus)[0].rows_per_link.sum()) / sample.shape[0], balance
    modes = ("flat", "hierarchical") if mode == "both" else (mode,)
    times = layer_times_us(dest_gpu, sources, topology, CostSettings(), modes=modes)
    return sum(times[m] for m in modes), balance


PROBE_LAYERS = 4  # layers tuned over every candidate setting before the others narrow the choice
KEPT_SETTINGS = 1  # settings the remaining layers choose between: those that won most probe layers


def plan_grace(profile: RoutingProfile, topology: Topology, replica_slots: int = 1,
               settings: GraceSettings | None = None, tune: bool = True, balance_limit: float = 1.12,
               seed: int = 0, progress=None, workers: int = 1, objective: str = "time") -> PlacementPlan:
    """GRACE plan. With `tune` and a profile that holds sampled routings, each layer keeps, among the
    candidate settings whose max/mean GPU load on the sample stays within `balance_limit`, the one with
    the lowest modeled time (`objective="copies"`: the fewest GPU copies per token) on the sample (the
    most balanced one if none stays within); otherwise `settings` is used.
    Deep models: PROBE_LAYERS layers spread over the depth try every candidate, the other layers the
    KEPT_SETTINGS that won most of them (a model's layers tend to want alike; 4x less work at 48 layers).
    Layers are independent: `workers` > 1 plans them in that many forked processes (same result)."""
    if objective not in OBJECTIVES:
        raise GraceInputError(f"grace planner: objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if not balance_limit >= 1.0:
        raise GraceInputError(f"grace planner: balance_limit is a max/mean load ratio, >= 1; got {balance_limit}")
    capacity = slot_capacity(profile.num_experts, topology, replica_slots)
    can_tune = tune and settings is None and profile.sample_topk_ids is not None and profile.coactivation is not None
    candidates = candidate_settings() if can_tune else [settings or GraceSettings()]
    job = _LayerJob(profile, topology, capacity, candidates, balance_limit, seed, OBJECTIVES[objective])
    layer_ids = list(range(profile.num_layers))
    probes = layer_ids
    if can_tune and profile.num_layers > PROBE_LAYERS:
        probes = sorted({round(i * (profile.num_layers - 1) / (PROBE_LAYERS - 1)) for i in range(PROBE_LAYERS)})
    results = dict(zip(probes, _plan_layers(job, probes, workers, progress)))
    rest = [li for li in layer_ids if li not in results]
    if rest:
        def key(settings: dict) -> tuple:  # "r" holds the ratio used, not the candidate's own (None: knee)
            return tuple(sorted((k, v) for k, v in settings.items() if k != "r"))

        wins = Counter(key(results[li][2]) for li in probes)
        kept = {won for won, _ in wins.most_common(KEPT_SETTINGS)}
        narrowed = dataclasses.replace(job, candidates=[c for c in candidates if key(asdict(c)) in kept])
        results.update(zip(rest, _plan_layers(narrowed, rest, workers, progress)))
    layers = [(results[li][0], results[li][1]) for li in layer_ids]
    used = [results[li][2] for li in layer_ids]
    return assemble_plan(layers, profile, topology, "grace", replica_slots,
                         {"tuned": can_tune, "seed": seed, "objective": objective, "balance_limit": balance_limit,
                          "layer_settings": used})


def _plan_layers(job: "_LayerJob", layer_ids: list[int], workers: int, progress) -> list:
    """job.plan_layer of each layer, in order; in forked processes when workers > 1."""
    if workers > 1 and len(layer_ids) > 1 and "fork" in multiprocessing.get_all_start_methods():
        global _JOB
        _JOB = job  # forked workers inherit it: nothing but layer numbers and plain lists crosses
        importlib.import_module("sklearn.cluster")  # imported once, before the fork, not in every worker
        try:
            # One intra-op thread per worker: processes are the parallelism, and a forked OpenMP pool
            # that the parent had started would hang the child.
            with multiprocessing.get_context("fork").Pool(min(workers, len(layer_ids)),
                                                          initializer=torch.set_num_threads, initargs=(1,)) as pool:
                results = []
                for result in pool.imap(_plan_layer_of_job, layer_ids):
                    results.append(result)
                    if progress is not None:
                        progress.update(1)
                return results
        finally:
            _JOB = None
    results = []
    for li in layer_ids:
        results.append(job.plan_layer(li))
        if progress is not None:
            progress.update(1)
    return results


@dataclass
class _LayerJob:
    profile: RoutingProfile
    topology: Topology
    capacity: int
    candidates: list[GraceSettings]
    balance_limit: float
    seed: int
    score_mode: str = "both"

    def plan_layer(self, li: int) -> tuple[list[list[int]], list[list[bool]], dict]:
        """(copies per GPU, primary flags, the settings used) for layer li."""
        profile, topology, capacity = self.profile, self.topology, self.capacity
        affinity = profile.coactivation[li] if profile.coactivation is not None else None
        load = profile.expert_load[li]
        options = self.candidates
        sample = profile.sample_topk_ids[:, li] if profile.sample_topk_ids is not None else None
        best, groupings = None, {}
        for option in options:
            lists, primary, r = place_layer(affinity, load, topology, capacity, option, self.seed, sample, groupings)
            score = (0.0, 0.0)
            if len(options) > 1:
                cost, balance = score_layer(lists, primary, load, sample, topology, capacity,
                                            profile.num_experts, profile.top_k, self.score_mode)
                score = (0.0, cost) if balance <= self.balance_limit else (1.0, balance)
            if best is None or score < best[0]:
                best = (score, lists, primary, option, r)
        return best[1], best[2], {**asdict(best[3]), "r": best[4]}


_JOB: _LayerJob | None = None


def _plan_layer_of_job(li: int):
    return _JOB.plan_layer(li)
