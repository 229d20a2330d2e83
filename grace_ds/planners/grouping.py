"""Partition the experts of one layer into groups that fire together, under size and load bounds.

affinity [n, n]: co-activation counts (symmetric, zero diagonal); load [n]: tokens per expert.
Every function returns labels [n] int64 with values in [0, num_groups).
"""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch


def spectral_labels(affinity: torch.Tensor, num_groups: int, seed: int = 0) -> torch.Tensor:
    """Spectral clustering of the co-activation graph (the paper's grouping), sizes unconstrained."""
    key = (hashlib.sha1(affinity.double().numpy().tobytes()).hexdigest(), tuple(affinity.shape), num_groups, seed)
    if key not in _SPECTRAL_CACHE:
        if len(_SPECTRAL_CACHE) > 4096:
            _SPECTRAL_CACHE.clear()
        _SPECTRAL_CACHE[key] = _spectral_labels(affinity, num_groups, seed)
    return _SPECTRAL_CACHE[key].clone()


# The planner's candidate settings share their spectral starting points; clustering dominates its time.
_SPECTRAL_CACHE: dict[tuple, torch.Tensor] = {}


def _spectral_labels(affinity: torch.Tensor, num_groups: int, seed: int) -> torch.Tensor:
    n = affinity.shape[0]
    if num_groups <= 1 or n <= num_groups:
        return torch.arange(n) % max(num_groups, 1)
    from sklearn.cluster import SpectralClustering

    graph = affinity.double().numpy()
    graph = graph + 1e-9 * graph.max() + 1e-12  # keeps isolated experts (no co-activation) connected
    np.fill_diagonal(graph, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected" cannot happen after the epsilon
        model = SpectralClustering(num_groups, affinity="precomputed", assign_labels="cluster_qr", random_state=seed)
        labels = model.fit_predict(graph)
    return torch.as_tensor(labels, dtype=torch.int64)


def repair_sizes(labels: torch.Tensor, affinity: torch.Tensor, num_groups: int,
                 min_size: list[int] | int, max_size: list[int] | int) -> torch.Tensor:
    """Bring every group's size into [min_size[g], max_size[g]] (the method page's corrected Algorithm 2).

    Oversized groups drop their members with the lowest affinity to the rest of the group into an
    overflow set; each overflow expert joins the group with room where its affinity is highest;
    groups under their minimum then take the lowest-affinity members of groups above theirs.
    """
    n = labels.shape[0]
    lo = [min_size] * num_groups if isinstance(min_size, int) else list(min_size)
    hi = [max_size] * num_groups if isinstance(max_size, int) else list(max_size)
    if sum(lo) > n or sum(hi) < n or any(a > b for a, b in zip(lo, hi)):
        raise ValueError(f"group size bounds {lo}..{hi} cannot hold {n} experts")
    lab = labels.numpy().copy()
    aff = affinity.double().numpy()

    def to_groups(expert: int) -> np.ndarray:  # [G]: affinity of one expert to every group
        return np.bincount(lab[lab >= 0], weights=aff[expert, lab >= 0], minlength=num_groups)

    overflow: list[int] = []
    for group in range(num_groups):
        members = np.flatnonzero(lab == group)
        while members.size > hi[group]:
            weakest = int(members[np.argmin(aff[np.ix_(members, members)].sum(1))])
            lab[weakest] = -1
            overflow.append(weakest)
            members = members[members != weakest]
    # Strongest-tied experts first, so they get their best group while it still has room.
    overflow.sort(key=lambda e: -float(aff[e].sum()))
    for expert in overflow:
        sizes = np.bincount(lab[lab >= 0], minlength=num_groups)
        gain = to_groups(expert)
        open_groups = np.flatnonzero(sizes < np.asarray(hi))
        # Highest affinity, then the smaller group.
        lab[expert] = int(open_groups[np.lexsort((sizes[open_groups], -gain[open_groups]))[0]])
    for group in range(num_groups):
        while int((lab == group).sum()) < lo[group]:
            sizes = np.bincount(lab, minlength=num_groups)
            donors = [g for g in range(num_groups) if sizes[g] > lo[g] and g != group]
            candidates = np.flatnonzero(np.isin(lab, donors))
            onehot = np.zeros((n, num_groups))
            onehot[np.arange(n), lab] = 1.0
            to_group = aff[candidates] @ onehot  # [c, G]
            # Move the expert that loses least affinity leaving its group and gains most joining this one.
            change = to_group[:, group] - to_group[np.arange(candidates.size), lab[candidates]]
            lab[int(candidates[np.argmax(change)])] = group
    labels = torch.as_tensor(lab, dtype=torch.int64)
    return labels


def _take_best_step(lab: np.ndarray, move_gain: np.ndarray, swap_gain_fn, w: np.ndarray, cap: np.ndarray,
                    lo: np.ndarray, hi: np.ndarray, num_groups: int, min_gain: float) -> bool:
    """Apply the best single move (move_gain [n, G]) to labels `lab` in place, else the best swap
    (swap_gain_fn() -> [n, n], computed only when no move qualifies: it is the costly part).

    While a group is over its load cap, the step that cuts the total excess most wins (ties: gain);
    afterwards, the step with the largest gain (> min_gain) that keeps every group under its cap.
    Sizes stay within [lo, hi]. Returns False when no step qualifies."""
    n = lab.shape[0]
    if n == 0 or num_groups == 0:  # e.g. a node given no expert (fewer experts than GPUs): nothing to move
        return False
    onehot = np.zeros((n, num_groups))
    onehot[np.arange(n), lab] = 1.0
    group_load, sizes = onehot.T @ w, onehot.sum(0)
    over = np.maximum(group_load - cap, 0.0)
    total_over = over.sum()

    def score(gain: np.ndarray, ok: np.ndarray, over_after: np.ndarray) -> np.ndarray:
        if total_over > 1e-9:
            return np.where(ok & (over_after < total_over - 1e-9), (total_over - over_after) * 1e9 + gain, -np.inf)
        return np.where(ok & (over_after <= 1e-9) & (gain > min_gain), gain, -np.inf)

    new_from = group_load[lab][:, None] - w[:, None]
    new_to = group_load[None, :] + w[:, None]
    move_over = (total_over - over[lab][:, None] - over[None, :]
                 + np.maximum(new_from - cap[lab][:, None], 0) + np.maximum(new_to - cap[None, :], 0))
    move_ok = (sizes[lab][:, None] - 1 >= lo[lab][:, None]) & (sizes[None, :] + 1 <= hi[None, :])
    move_ok &= lab[:, None] != np.arange(num_groups)[None, :]
    move_score = score(move_gain, move_ok, move_over)
    if np.isfinite(move_score.max()):
        e, b = np.unravel_index(int(move_score.argmax()), move_score.shape)
        lab[e] = b
        return True
    ga, gb = lab[:, None], lab[None, :]
    delta = w[None, :] - w[:, None]  # group of e gains w_f - w_e
    swap_over = (total_over - over[ga] - over[gb]
                 + np.maximum(group_load[ga] + delta - cap[ga], 0) + np.maximum(group_load[gb] - delta - cap[gb], 0))
    swap_score = score(swap_gain_fn(), ga != gb, swap_over)
    if not np.isfinite(swap_score.max()):
        return False
    e, f = np.unravel_index(int(swap_score.argmax()), swap_score.shape)
    lab[e], lab[f] = lab[f], lab[e]
    return True


def refine_by_moves(labels: torch.Tensor, affinity: torch.Tensor, load: torch.Tensor, num_groups: int,
                    min_size: list[int], max_size: list[int], load_target: list[float], load_slack: float,
                    max_steps: int = 2000) -> torch.Tensor:
    """Greedy local search over single moves and pairwise swaps (see _take_best_step) whose gain is the
    co-activation brought inside groups; loads end within (1 + load_slack) x target where possible."""
    aff = affinity.double().numpy()
    w = load.double().numpy()
    lab = labels.numpy().copy()
    n = lab.shape[0]
    cap = np.asarray(load_target, dtype=np.float64) * (1.0 + load_slack)
    lo, hi = np.asarray(min_size), np.asarray(max_size)
    for _ in range(max_steps):
        onehot = np.zeros((n, num_groups))
        onehot[np.arange(n), lab] = 1.0
        to_group = aff @ onehot  # [n, G] affinity of each expert to each group
        own = to_group[np.arange(n), lab]
        move_gain = to_group - own[:, None]

        def swap_gain() -> np.ndarray:  # e <-> f: both moves, minus their own edge counted in both
            return to_group[:, lab] - own[:, None] + to_group[:, lab].T - own[None, :] - 2.0 * aff

        if not _take_best_step(lab, move_gain, swap_gain, w, cap, lo, hi, num_groups, 1e-9):
            break
    return torch.as_tensor(lab, dtype=torch.int64)


def refine_by_token_moves(labels: torch.Tensor, hits: torch.Tensor, load: torch.Tensor, num_groups: int,
                          min_size: list[int], max_size: list[int], load_target: list[float], load_slack: float,
                          max_steps: int = 2000) -> torch.Tensor:
    """Like refine_by_moves, but the objective is exact on sampled tokens: hits [S, n] (token's top-k
    holds expert) -> total number of distinct groups the tokens touch (the hypergraph connectivity;
    every group a token touches beyond its own is one copy sent). Lower is better."""
    from scipy import sparse

    # A token holds k of n experts: sparse products count the same integers several times faster.
    m = sparse.csr_matrix(hits.float().numpy())
    m_t = m.T.tocsr()
    w = load.double().numpy()
    lab = labels.numpy().copy()
    n = lab.shape[0]
    cap = np.asarray(load_target, dtype=np.float64) * (1.0 + load_slack)
    lo, hi = np.asarray(min_size), np.asarray(max_size)
    rows = np.arange(n)
    for _ in range(max_steps):
        onehot = np.zeros((n, num_groups), dtype=np.float32)
        onehot[rows, lab] = 1.0
        per_group = m @ onehot  # [S, G] experts of each group in each token's top-k
        only_one = (per_group == 1).astype(np.float32)
        leave = (m_t @ only_one)[rows, lab]  # tokens of e that stop touching e's group if e leaves
        join = m_t @ (per_group == 0).astype(np.float32)  # [n, G] tokens of e that start touching g
        move_gain = leave[:, None] - join
        # Swap e <-> f: both moves, minus what tokens holding both e and f counted twice.

        def swap_gain() -> np.ndarray:
            only_own = m.multiply(only_one[:, lab]).tocsr()  # [S, n]: token holds e, alone in its group
            both = (only_own.T @ m).toarray()  # [n, n]; its transpose is the same count seen from f
            return move_gain[:, lab] + move_gain[:, lab].T - (both + both.T)

        if not _take_best_step(lab, move_gain, swap_gain, w, cap, lo, hi, num_groups, 0.5):
            break
    return torch.as_tensor(lab, dtype=torch.int64)


def balanced_labels(affinity: torch.Tensor, load: torch.Tensor, num_groups: int, min_size: list[int],
                    max_size: list[int], load_share: list[float], load_slack: float, seed: int = 0,
                    hits: torch.Tensor | None = None) -> torch.Tensor:
    """Load-weighted partition: group loads follow load_share (fractions summing to 1) within load_slack,
    sizes within bounds, as much co-activation inside groups as the search finds; with sampled token
    hits [S, n], the search then minimises the groups each token touches exactly."""
    n = affinity.shape[0]
    if num_groups <= 1:
        return torch.zeros(n, dtype=torch.int64)
    # Spectral starts pay off for sizeable groups; for a few experts per group LPT starts just as well.
    spectral = float(affinity.sum()) > 0 and n >= 4 * num_groups
    start = spectral_labels(affinity, num_groups, seed) if spectral else lpt_labels(load, num_groups)
    start = repair_sizes(start, affinity, num_groups, min_size, max_size)
    target = [float(load.sum()) * s for s in load_share]
    labels = refine_by_moves(start, affinity, load, num_groups, min_size, max_size, target, load_slack)
    if hits is not None and hits.shape[0] > 0:
        labels = refine_by_token_moves(labels, hits, load, num_groups, min_size, max_size, target, load_slack)
    return labels


def lpt_labels(load: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Longest-processing-time-first spread, for load-only profiles (no affinity to follow)."""
    labels = torch.empty(load.shape[0], dtype=torch.int64)
    totals = [0.0] * num_groups
    counts = [0] * num_groups
    per_group = -(-load.shape[0] // num_groups)
    for e in torch.argsort(load, descending=True).tolist():
        g = min((g for g in range(num_groups) if counts[g] < per_group), key=lambda g: totals[g])
        labels[e] = g
        totals[g] += float(load[e])
        counts[g] += 1
    return labels


def in_group_affinity_share(labels: torch.Tensor, affinity: torch.Tensor) -> float:
    """U: co-activation inside groups / all co-activation (1.0 when there is none)."""
    total = float(affinity.sum())
    if total <= 0:
        return 1.0
    same = labels.view(-1, 1) == labels.view(1, -1)
    return float(affinity[same].sum()) / total
