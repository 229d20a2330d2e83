"""CUDA graphs of the gather exchange: a decode MoE call replayed in one launch.

A decode call moves few bytes and computes little; launching its ~40 kernels and its collectives from
Python takes longer than running them (4x H200 as 2 x 2, OLMoE shape, ring collectives: the gather
exchange's fixed cost 3.03 ms eager, 1.36 ms replayed, in two runs of 2026-11-28 kept in git history).
So each (layer, token bucket) is captured once: router -> pack -> gather exchange -> experts -> partial
outputs summed back, on static buffers padded to the bucket. A call copies its tokens in, marks how many are real, replays, and copies its rows out. Every rank
picks the same bucket from the same token counts, so their graphs hold matching collectives.

Padding rows get slot -1 (no rank computes them) and come after the real tokens, so the replica
router's round-robin gives the real tokens the copies the eager path would. Graphs hold the slot weights
and routing tables by address: `clear()` drops them when the plan changes (GraceRuntime.switch_plan).
Without capture (CPU) the same padded body runs eagerly, which is what the CPU tests check.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from grace_ds.exchange.expert_compute import ExpertCompute, PairwiseExperts
from grace_ds.exchange.gather import GatherExchange
from grace_ds.served_plan import ServedPlan

SMALLEST_BUCKET = 8


def token_bucket(largest: int, limit: int) -> int | None:
    """Tokens per rank to pad a call to: the next power of two from SMALLEST_BUCKET, capped at `limit`;
    None when the call is larger than `limit` (no graph: it runs eagerly)."""
    if largest > limit:
        return None
    bucket = SMALLEST_BUCKET
    while bucket < largest:
        bucket *= 2
    return min(bucket, max(limit, largest))


@dataclass
class _Entry:
    hidden: torch.Tensor  # [B, H]
    top_k_index: torch.Tensor  # [B, k]
    top_k_weights: torch.Tensor  # [B, k] float32
    num_real: torch.Tensor  # [] this call's real tokens, on the device
    experts: ExpertCompute  # held, so that its id (in the key) cannot be reused by another module
    out: torch.Tensor | None = None  # [B, H]
    graph: "torch.cuda.CUDAGraph | None" = None


class GraphedGather:
    """Per (layer, bucket): static buffers and, when `capture`, a CUDA graph of the whole gather call:
    route (served.router) -> gather exchange -> experts -> combine."""

    WARMUP_CALLS = 2  # eager runs on a side stream before capture (lazy initialisations happen there)

    def __init__(self, served: ServedPlan, gather: GatherExchange, capture: bool, max_tokens: int) -> None:
        self.served, self.gather = served, gather
        self.capture, self.max_tokens = capture, max_tokens
        self._entries: dict[tuple, _Entry] = {}
        self._pool = None
        self.calls = 0  # calls served here
        self.replays = 0  # of which by a captured graph

    def clear(self) -> None:
        self._entries.clear()

    def bucket(self, largest: int, experts: ExpertCompute) -> int | None:
        """The bucket a call whose largest rank holds `largest` tokens replays (None: run it eagerly).
        Plain callables run eagerly: their wrapper is made per call, and an entry is kept per experts object."""
        if isinstance(experts, PairwiseExperts) or (self.capture and not experts.capturable):
            return None
        return token_bucket(largest, self.max_tokens)

    def __call__(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 bucket: int, experts: ExpertCompute) -> torch.Tensor:
        """Same result as the eager gather call for this rank's tokens [N, H]; bucket >= every rank's N."""
        key = (layer, bucket, hidden.shape[1], hidden.dtype, top_k_index.shape[1], id(experts))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._build(layer, hidden, top_k_index, bucket, experts)
        num_tokens = hidden.shape[0]
        entry.hidden[:num_tokens].copy_(hidden)
        entry.top_k_index[:num_tokens].copy_(top_k_index)
        entry.top_k_weights[:num_tokens].copy_(top_k_weights)
        entry.num_real.fill_(num_tokens)
        self.calls += 1
        if entry.graph is not None:
            entry.graph.replay()
            self.replays += 1
        else:
            entry.out = self._body(layer, entry)
        return entry.out[:num_tokens].clone()

    def _body(self, layer: int, entry: _Entry) -> torch.Tensor:
        bucket = entry.hidden.shape[0]
        slots = self.served.router.route(layer, entry.top_k_index, self.served.rank)
        real = torch.arange(bucket, device=slots.device) < entry.num_real
        slots = torch.where(real.unsqueeze(-1), slots, -1)
        return self.gather.for_call(bucket)(entry.hidden, slots, entry.top_k_weights, entry.experts, f" of layer {layer}")

    def _build(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, bucket: int,
               experts: ExpertCompute) -> _Entry:
        device = hidden.device
        entry = _Entry(hidden.new_zeros((bucket, hidden.shape[1])),
                       torch.zeros((bucket, top_k_index.shape[1]), dtype=top_k_index.dtype, device=device),
                       torch.zeros((bucket, top_k_index.shape[1]), dtype=torch.float32, device=device),
                       torch.zeros((), dtype=torch.long, device=device), experts)
        if not self.capture:
            return entry
        self.served.router.tables(layer)  # built outside the capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                self._body(layer, entry)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                entry.out = self._body(layer, entry)
            entry.graph = graph
        except RuntimeError as error:  # this rank serves the call eagerly: same collectives, same order
            warnings.warn(f"GRACE: no CUDA graph for layer {layer} (bucket {bucket} tokens), eager instead: {error}")
        return entry
