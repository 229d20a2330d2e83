"""Routing statistics of the last few serving steps, kept on the device for online re-planning.

A ring of `buckets` partial sums, each covering window_steps / buckets steps: the window slides a
bucket at a time, so old traffic leaves it without storing every step. Per layer it holds expert load
[E], co-activation [E, E] and token counts, plus the latest `sample_tokens` top-k sets (the planner
scores candidate moves on whole token routings). Counting is one scatter and one small matmul per layer
call; nothing leaves the device until `to_profile`, which sums over ranks in one all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.hooks import routing_counts
from grace_ds.profile import RoutingProfile


class RoutingWindow:
    """load [B, L, E], coactivation [B, L, E, E] (float64), tokens [B, L] per bucket; samples [L, S, k]."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, window_steps: int = 64, buckets: int = 4,
                 sample_tokens: int = 1024, device: torch.device | str = "cpu", model_name: str = "unknown",
                 layer_names: list[str] | None = None) -> None:
        if window_steps < 1 or buckets < 1 or window_steps % buckets:
            raise GraceInputError(f"routing window: window_steps ({window_steps}) must be a positive multiple of "
                                  f"buckets ({buckets})")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.steps_per_bucket = window_steps // buckets
        self.model_name = model_name
        self.layer_names = layer_names or [f"layer_{i}" for i in range(num_layers)]
        self.load = torch.zeros(buckets, num_layers, num_experts, dtype=torch.float64, device=device)
        self.coactivation = torch.zeros(buckets, num_layers, num_experts, num_experts, dtype=torch.float64,
                                        device=device)
        self.tokens = torch.zeros(buckets, num_layers, dtype=torch.float64, device=device)
        self.samples = torch.full((num_layers, sample_tokens, top_k), -1, dtype=torch.int64, device=device)
        self._sample_next = [0] * num_layers  # ring write position per layer (host ints: no device sync)
        self._sample_filled = [0] * num_layers
        self.bucket, self.steps_in_bucket, self.steps = 0, 0, 0

    def observe(self, layer: int, top_k_index: torch.Tensor) -> None:
        ids = top_k_index.detach().reshape(-1, top_k_index.shape[-1]).long()
        load, coactivation = routing_counts(ids, self.num_experts)
        self.load[self.bucket, layer] += load.to(self.load.device).double()
        self.coactivation[self.bucket, layer] += coactivation.to(self.load.device).double()
        self.tokens[self.bucket, layer] += ids.shape[0]
        self._keep_sample(layer, ids)

    def _keep_sample(self, layer: int, ids: torch.Tensor) -> None:
        capacity = self.samples.shape[1]
        ids = ids[-capacity:].to(self.samples.device)
        start = self._sample_next[layer]
        first = min(capacity - start, ids.shape[0])
        self.samples[layer, start:start + first] = ids[:first]
        self.samples[layer, :ids.shape[0] - first] = ids[first:]
        self._sample_next[layer] = (start + ids.shape[0]) % capacity
        self._sample_filled[layer] = min(capacity, self._sample_filled[layer] + ids.shape[0])

    def end_step(self) -> None:
        """A serving step ended; every steps_per_bucket steps the oldest bucket is cleared and reused."""
        self.steps += 1
        self.steps_in_bucket += 1
        if self.steps_in_bucket == self.steps_per_bucket:
            self.steps_in_bucket = 0
            self.bucket = (self.bucket + 1) % self.load.shape[0]
            self.load[self.bucket].zero_()
            self.coactivation[self.bucket].zero_()
            self.tokens[self.bucket].zero_()

    def to_profile(self, group=None) -> RoutingProfile:
        """The window summed over every rank of `group` (one all-reduce, and one all-gather of the samples)
        as a RoutingProfile on the host; every rank gets the same one."""
        load, coactivation, tokens = self.load.sum(0), self.coactivation.sum(0), self.tokens.sum(0)
        depth = min(self._sample_filled)
        samples = self.samples[:, :depth]
        if dist.is_available() and dist.is_initialized():
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                      else torch.device("cpu"))
            flat = torch.cat([load.flatten(), coactivation.flatten(), tokens]).to(device)
            faults.all_reduce(flat, "online re-planning (summing the routing window over ranks)", group)
            flat = flat.cpu()
            load = flat[:load.numel()].view_as(load)
            coactivation = flat[load.numel():load.numel() + coactivation.numel()].view_as(coactivation)
            tokens = flat[-tokens.numel():]
            # Ranks keep equally many samples when they serve equally many tokens; keep the common depth.
            depths = faults.all_gather_tensor(torch.tensor([depth], device=device),
                                              "online re-planning (sample depth)", group).flatten()
            depth = int(depths.min())
            gathered = faults.all_gather_tensor(self.samples[:, :depth].to(device).contiguous(),
                                                "online re-planning (gathering sampled routings)", group)
            samples = gathered.permute(1, 0, 2, 3).reshape(self.num_layers, -1, self.top_k)
        coactivation = coactivation.cpu().clone()
        coactivation.diagonal(dim1=1, dim2=2).zero_()
        tokens = tokens.cpu().round().long()
        if (tokens < 1).any():
            raise GraceInputError("routing window: some layer saw no tokens yet; serve a step before re-planning")
        sample = samples.cpu().permute(1, 0, 2).contiguous() if samples.shape[1] > 0 else None
        return RoutingProfile(load.cpu(), coactivation, tokens, self.top_k, self.model_name,
                              list(self.layer_names), sample)
