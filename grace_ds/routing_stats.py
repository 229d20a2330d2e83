"""RoutingStats: per-layer routing statistics counted on the device, summed over ranks into a RoutingProfile.

One class for offline profiling and online re-planning. Per layer it counts expert load [E],
co-activation [E, E] and tokens, keeps `sample_tokens` whole top-k sets (planners score candidate plans
on real routings) and, when given the router's physical picks, the pairs each GPU computed [P]. Counting
is one scatter and one small matmul per layer call; nothing leaves the device until `to_profile`, which
sums over ranks in one all-reduce.

Without a window (profiling) the counts cover everything observed and the samples are the first
`sample_tokens` top-k sets of this rank. With `window_steps` (online re-planning) the counts are a ring
of `buckets` partial sums, each covering window_steps / buckets steps, so old traffic leaves a bucket at
a time without storing every step; the samples are the latest ones, gathered from every rank so that all
ranks get the same profile.
"""
from __future__ import annotations

import torch
from torch import nn

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.routing_profile import DEFAULT_SAMPLE_TOKENS, RoutingProfile


def routing_counts(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (pairs per expert [E], tokens per expert pair [E, E] with the diagonal = load),
    float32 on the ids' device: one scatter and one small matmul."""
    hits = torch.zeros(topk_ids.shape[0], num_experts, dtype=torch.float32, device=topk_ids.device)
    hits.scatter_(1, topk_ids.long(), 1.0)
    return hits.sum(0), hits.T @ hits


class RoutingStats:
    """load [B, L, E], coactivation [B, L, E, E], tokens [B, L] and gpu_load [B, L, P] (float64) per bucket
    (B = 1 without a window); samples [L, S, k]. `num_gpus`, `slots_per_gpu`: the plan whose physical slot
    ids `observe` may be given (gpu_load stays zero without them)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, device: torch.device | str = "cpu",
                 model_name: str = "unknown", layer_names: list[str] | None = None,
                 sample_tokens: int = DEFAULT_SAMPLE_TOKENS, window_steps: int | None = None, buckets: int = 1,
                 num_gpus: int = 0, slots_per_gpu: int = 1) -> None:
        if window_steps is not None and (window_steps < 1 or buckets < 1 or window_steps % buckets):
            raise GraceInputError(f"routing window: window_steps ({window_steps}) must be a positive multiple of "
                                  f"buckets ({buckets})")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.windowed = window_steps is not None
        buckets = buckets if self.windowed else 1
        self.steps_per_bucket = window_steps // buckets if self.windowed else 0
        self.model_name = model_name
        self.layer_names = layer_names or [f"layer_{i}" for i in range(num_layers)]
        self.slots_per_gpu = slots_per_gpu
        zeros = dict(dtype=torch.float64, device=device)
        self.load = torch.zeros(buckets, num_layers, num_experts, **zeros)
        self.coactivation = torch.zeros(buckets, num_layers, num_experts, num_experts, **zeros)
        self.tokens = torch.zeros(buckets, num_layers, **zeros)
        self.gpu_load = torch.zeros(buckets, num_layers, num_gpus, **zeros)
        self.samples = torch.full((num_layers, sample_tokens, top_k), -1, dtype=torch.int64, device=device)
        self._sample_next = [0] * num_layers  # write position per layer (host ints: no device sync)
        self._sample_filled = [0] * num_layers
        self.bucket, self.steps_in_bucket, self.steps = 0, 0, 0
        self.enabled = True
        self._handles: list = []

    # ---- counting ------------------------------------------------------------------------------
    def observe(self, layer: int, top_k_index: torch.Tensor, slot_ids: torch.Tensor | None = None) -> None:
        """top_k_index [..., k] logical picks of one layer call; slot_ids [T, k] the physical slots the
        router gave them (counted per GPU: the loads drift is measured on)."""
        if not self.enabled:
            return
        ids = top_k_index.detach().reshape(-1, top_k_index.shape[-1]).long()
        load, coactivation = routing_counts(ids, self.num_experts)
        self.load[self.bucket, layer] += load.to(self.load.device).double()
        self.coactivation[self.bucket, layer] += coactivation.to(self.load.device).double()
        self.tokens[self.bucket, layer] += ids.shape[0]
        if slot_ids is not None and self.gpu_load.shape[-1]:  # a recorder without a plan counts no GPUs
            gpus = (slot_ids.reshape(-1).long() // self.slots_per_gpu).to(self.gpu_load.device)
            self.gpu_load[self.bucket, layer].index_add_(0, gpus, torch.ones_like(gpus, dtype=torch.float64))
        self._keep_sample(layer, ids)

    def _keep_sample(self, layer: int, ids: torch.Tensor) -> None:
        capacity = self.samples.shape[1]
        if not self.windowed:  # the first sample_tokens sets, then nothing more
            ids = ids[:capacity - self._sample_filled[layer]]
        ids = ids[-capacity:].to(self.samples.device) if capacity else ids[:0]
        start = self._sample_next[layer]
        first = min(capacity - start, ids.shape[0])
        self.samples[layer, start:start + first] = ids[:first]
        self.samples[layer, :ids.shape[0] - first] = ids[first:]
        self._sample_next[layer] = (start + ids.shape[0]) % capacity if capacity else 0
        self._sample_filled[layer] = min(capacity, self._sample_filled[layer] + ids.shape[0])

    def end_step(self) -> None:
        """A serving step ended; with a window, every steps_per_bucket steps the oldest bucket is cleared
        and reused."""
        self.steps += 1
        if not self.windowed:
            return
        self.steps_in_bucket += 1
        if self.steps_in_bucket == self.steps_per_bucket:
            self.steps_in_bucket = 0
            self.bucket = (self.bucket + 1) % self.load.shape[0]
            for counts in (self.load, self.coactivation, self.tokens, self.gpu_load):
                counts[self.bucket].zero_()

    def forget_gpu_loads(self) -> None:
        """After a plan switch: GPU loads under the old plan say nothing about the new one."""
        self.gpu_load.zero_()

    # ---- summing -------------------------------------------------------------------------------
    def totals(self, group=None, reduce: bool = True) -> tuple[RoutingProfile, torch.Tensor]:
        """(the profile, gpu_load [L, P] pairs each GPU computed) summed over the buckets and, with
        `reduce` and torch.distributed up, over every rank of `group` in one all-reduce."""
        load, coactivation = self.load.sum(0), self.coactivation.sum(0)
        tokens, gpu_load = self.tokens.sum(0), self.gpu_load.sum(0)
        depth = min(self._sample_filled, default=0)
        samples = self.samples[:, :depth]
        if reduce and faults.distributed():
            device = faults.collective_device(group)
            parts = (load, coactivation, tokens, gpu_load)
            # One collective for all (token counts are exact in float64 far beyond any trace).
            flat = torch.cat([p.flatten() for p in parts]).to(device)
            phase = ("online re-planning (summing the routing window over ranks)" if self.windowed
                     else "profiling (summing routing statistics over ranks)")
            faults.all_reduce(flat, phase, group)
            load, coactivation, tokens, gpu_load = (
                chunk.view_as(p) for chunk, p in zip(flat.cpu().split([p.numel() for p in parts]), parts))
            if self.windowed:
                samples = self._gathered_samples(depth, device, group)
        coactivation = coactivation.cpu().clone()
        coactivation.diagonal(dim1=1, dim2=2).zero_()
        tokens = tokens.cpu().round().long()
        if self.windowed and (tokens < 1).any():
            raise GraceInputError("routing window: some layer saw no tokens yet; serve a step before re-planning")
        sample = samples.cpu().permute(1, 0, 2).contiguous() if samples.shape[1] > 0 else None
        profile = RoutingProfile(load.cpu(), coactivation, tokens, self.top_k, self.model_name,
                                 list(self.layer_names), sample)
        return profile, gpu_load.cpu()

    def to_profile(self, group=None, reduce: bool = True) -> RoutingProfile:
        return self.totals(group, reduce)[0]

    def _gathered_samples(self, depth: int, device: torch.device, group) -> torch.Tensor:
        """[L, ranks x depth, k]: every rank's latest samples. Ranks keep equally many samples when they
        serve equally many tokens; the common depth is kept."""
        depths = faults.all_gather_tensor(torch.tensor([depth], device=device),
                                          "online re-planning (sample depth)", group).flatten()
        depth = int(depths.min())
        gathered = faults.all_gather_tensor(self.samples[:, :depth].to(device).contiguous(),
                                            "online re-planning (gathering sampled routings)", group)
        return gathered.permute(1, 0, 2, 3).reshape(self.num_layers, -1, self.top_k)

    # ---- hooks on a model's routers ----------------------------------------------------------------
    def attach_to_routers(self, blocks: list[tuple[str, nn.Module]]) -> "RoutingStats":
        """Forward hooks on each transformers MoE block's router, whose output is (logits, weights, index)."""
        for layer, (_, block) in enumerate(blocks):
            router = getattr(block, "gate", None) or getattr(block, "router")

            def hook(module, inputs, output, layer=layer):
                self.observe(layer, output[2])

            self._handles.append(router.register_forward_hook(hook))
        return self

    def attach_to_deepspeed_gates(self, layers: list[nn.Module]) -> "RoutingStats":
        """Forward hooks on the TopKGate of each deepspeed.moe.layer.MoE; DeepSpeed 0.19 calls it with
        sparse routes, whose 4th output is indices [k, S] (-1 for a dropped route)."""
        for layer, moe in enumerate(layers):
            def hook(module, inputs, output, layer=layer):
                indices = output[3].T.long()
                if (indices >= 0).all():
                    self.observe(layer, indices)
                else:  # dropped routes: count each token's surviving picks only
                    for k in range(1, indices.shape[1] + 1):
                        kept = (indices >= 0).sum(1) == k
                        if kept.any():
                            self.observe(layer, indices[kept].sort(1, descending=True).values[:, :k])

            self._handles.append(moe.deepspeed_moe.gate.register_forward_hook(hook))
        return self

    def attach_to_megatron_routers(self, layers: list[nn.Module]) -> "RoutingStats":
        """Forward hooks on the router of each megatron-core MoELayer (output: probs, routing_map [T, E])."""
        from grace_ds.megatron import top_k_from_routing

        for layer, moe in enumerate(layers):
            def hook(module, inputs, output, layer=layer):
                probs, routing_map = output[0], output[1]
                self.observe(layer, top_k_from_routing(probs, routing_map, self.top_k)[0])

            self._handles.append(moe.router.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
