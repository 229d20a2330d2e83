"""Token exchange for small batches (decode): all-gather the tokens, reduce-scatter the outputs.

With a few tokens per GPU an all-to-all's cost is its fixed part: a split-size exchange the host waits
for, then rows, pair records and the combine, each a collective. Here every rank instead sends its
tokens, each with its k chosen slots and routing weights packed beside it in one byte row, to every
rank in one all-gather (padded to the largest rank's count, known per forward); each rank computes the
pairs routed to its own slots in fixed shapes; one reduce-scatter sums every token's partial outputs
onto its own rank. Two collectives, no host synchronisation. A token reaches every GPU, which costs
little more than the all-to-all when its top-k covers most GPUs anyway, and the replica router's
choices (which GPU computes each pair) are the same as under the all-to-all exchanges. Inference only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from grace_ds.faults import guarded

# Newer torch names them *_single; 2.11 (the GPU machine's) only has the older names.
_all_gather_rows = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_rows = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _pack(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor, padded_tokens: int) -> torch.Tensor:
    """[padded_tokens, H * dtype bytes + 8k] uint8: each token's hidden state, then its k slots (int32,
    -1 on padding rows, so no rank computes them), then its k weights (float32)."""
    num_tokens, top_k = slot_ids.shape
    hidden_bytes = hidden.contiguous().view(torch.uint8)
    packed = hidden_bytes.new_zeros((padded_tokens, hidden_bytes.shape[1] + 8 * top_k))
    end_hidden, end_slots = hidden_bytes.shape[1], hidden_bytes.shape[1] + 4 * top_k
    packed[:num_tokens, :end_hidden] = hidden_bytes
    packed[:num_tokens, end_hidden:end_slots] = slot_ids.to(torch.int32).contiguous().view(torch.uint8)
    packed[num_tokens:, end_hidden:end_slots] = 255  # int32 -1
    packed[:num_tokens, end_slots:] = topk_weights.to(torch.float32).contiguous().view(torch.uint8)
    return packed


def _unpack(packed: torch.Tensor, dtype: torch.dtype, hidden_size: int, top_k: int):
    """(hidden [M, H], slots [M, k] int32, weights [M, k] float32) of packed rows [M, B]."""
    end_hidden = hidden_size * torch.finfo(dtype).bits // 8
    end_slots = end_hidden + 4 * top_k
    return (packed[:, :end_hidden].contiguous().view(dtype), packed[:, end_hidden:end_slots].contiguous().view(torch.int32),
            packed[:, end_slots:].contiguous().view(torch.float32))


def gather_and_compute(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor, slots_per_gpu: int,
                       rank: int, world: int, padded_tokens: int, compute, group=None, traffic=None,
                       node_of_gpu: list[int] | None = None, where: str = "") -> torch.Tensor:
    """hidden [N, H] this rank's tokens; slot_ids [N, k] physical slots from the replica router; topk_weights
    [N, k]; padded_tokens >= every rank's N. Returns sum_k weight * expert(hidden) per token, [N, H].
    `compute(rows, slot)` gets every gathered pair, slot -1 where another rank computes it, when it has
    `accepts_unrouted` (SlotExperts: no host synchronisation); otherwise only this rank's pairs."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        raise RuntimeError("the gather exchange is for inference; run under torch.no_grad() or use flat/hierarchical")
    num_tokens, top_k = slot_ids.shape
    if padded_tokens < num_tokens:
        raise ValueError(f"padded_tokens {padded_tokens} < this rank's {num_tokens} tokens")
    packed = _pack(hidden, slot_ids, topk_weights, padded_tokens)
    gathered = packed.new_empty((world * padded_tokens, packed.shape[1]))
    guarded(f"dispatch{where} (gather)", group, _all_gather_rows, gathered, packed, group=group)
    rows, slots, weights = _unpack(gathered, hidden.dtype, hidden.shape[1], top_k)
    flat_slot = slots.reshape(-1).long()
    mine = (flat_slot >= 0) & (flat_slot // slots_per_gpu == rank)
    local_slot = torch.where(mine, flat_slot % slots_per_gpu, -1)
    pair_row = torch.arange(rows.shape[0], device=rows.device).repeat_interleave(top_k)
    if getattr(compute, "accepts_unrouted", False):
        expert_out = compute(rows[pair_row], local_slot)
        weighted = torch.where(mine.unsqueeze(-1), expert_out.float() * weights.reshape(-1, 1), 0.0)
        partial = weighted.view(rows.shape[0], top_k, -1).sum(1).to(hidden.dtype)
    else:  # arbitrary expert modules: compute this rank's pairs alone (finding them waits for the device)
        pick = mine.nonzero().flatten()
        expert_out = compute(rows[pair_row[pick]], local_slot[pick])
        partial = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        partial = partial.index_add(0, pair_row[pick], expert_out.float() * weights.reshape(-1)[pick].unsqueeze(-1))
        partial = partial.to(hidden.dtype)
    out = partial.new_empty((padded_tokens, partial.shape[1]))
    guarded(f"combine{where} (reduce-scatter)", group, _reduce_scatter_rows, out, partial, group=group)
    if traffic is not None:
        # Logical bytes: this rank's padded rows to every other rank, and its share of partials back.
        per_peer = padded_tokens * (packed.shape[1] + partial.shape[1] * partial.element_size())
        traffic.add_sent([per_peer] * world, rank, node_of_gpu or [0] * world)
        traffic.pairs_computed += int(mine.sum())
    return out[:num_tokens]

