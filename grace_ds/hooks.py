"""Profiling hooks: record per-layer expert load and co-activation during any forward, then reduce
across ranks into a RoutingProfile. Counting stays on the device (one scatter and one small matmul per
layer call); nothing leaves the device until `to_profile`."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from grace_ds import faults
from grace_ds.profile import DEFAULT_SAMPLE_TOKENS, RoutingProfile


def routing_counts(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (pairs per expert [E], tokens per expert pair [E, E] with the diagonal = load),
    float32 on the ids' device: one scatter and one small matmul."""
    hits = torch.zeros(topk_ids.shape[0], num_experts, dtype=torch.float32, device=topk_ids.device)
    hits.scatter_(1, topk_ids.long(), 1.0)
    return hits.sum(0), hits.T @ hits


class RoutingRecorder:
    """Accumulates load [L, E], co-activation [L, E, E], token counts [L] and the first sampled top-k sets."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, device: torch.device | str = "cpu",
                 model_name: str = "unknown", layer_names: list[str] | None = None,
                 sample_tokens: int = DEFAULT_SAMPLE_TOKENS) -> None:
        self.num_experts, self.top_k, self.model_name = num_experts, top_k, model_name
        self.layer_names = layer_names or [f"layer_{i}" for i in range(num_layers)]
        self.load = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.coactivation = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self.sample_tokens = sample_tokens
        self.samples: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._handles: list = []
        self.enabled = True

    def observe(self, layer: int, top_k_index: torch.Tensor) -> None:
        if not self.enabled:
            return
        ids = top_k_index.detach().reshape(-1, top_k_index.shape[-1]).long()
        load, coactivation = routing_counts(ids, self.num_experts)
        self.load[layer] += load.to(self.load.device).double()
        self.coactivation[layer] += coactivation.to(self.load.device).double()
        self.tokens[layer] += ids.shape[0]
        kept = sum(s.shape[0] for s in self.samples[layer])
        if kept < self.sample_tokens:
            self.samples[layer].append(ids[: self.sample_tokens - kept].cpu())

    def attach_to_routers(self, blocks: list[tuple[str, nn.Module]]) -> "RoutingRecorder":
        """Forward hooks on each transformers MoE block's router, whose output is (logits, weights, index)."""
        for layer, (_, block) in enumerate(blocks):
            router = getattr(block, "gate", None) or getattr(block, "router")

            def hook(module, inputs, output, layer=layer):
                self.observe(layer, output[2])

            self._handles.append(router.register_forward_hook(hook))
        return self

    def attach_to_deepspeed_gates(self, layers: list[nn.Module]) -> "RoutingRecorder":
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

    def attach_to_megatron_routers(self, layers: list[nn.Module]) -> "RoutingRecorder":
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

    def to_profile(self, group=None, reduce: bool = True) -> RoutingProfile:
        """Sum over all ranks of `group` (with `reduce` and torch.distributed up) into one profile; sampled
        top-k sets are this rank's."""
        load, coactivation, tokens = self.load.clone(), self.coactivation.clone(), self.tokens.clone()
        if reduce and dist.is_available() and dist.is_initialized():
            # NCCL reduces only device tensors, gloo only host ones.
            device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                      else torch.device("cpu"))
            # One collective for all three (token counts are exact in float64 far beyond any trace).
            flat = torch.cat([load.flatten(), coactivation.flatten(), tokens.double()]).to(device)
            faults.all_reduce(flat, "profiling (summing routing statistics over ranks)", group)
            flat = flat.cpu()
            load = flat[:load.numel()].view_as(load)
            coactivation = flat[load.numel():load.numel() + coactivation.numel()].view_as(coactivation)
            tokens = flat[-tokens.numel():].round().long()
        coactivation.diagonal(dim1=1, dim2=2).zero_()
        depth = min((sum(s.shape[0] for s in layer) for layer in self.samples), default=0)
        sample = None
        if depth > 0:
            sample = torch.stack([torch.cat(layer)[:depth] for layer in self.samples], 1)
        return RoutingProfile(load.cpu(), coactivation.cpu(), tokens.cpu(), self.top_k, self.model_name,
                              list(self.layer_names), sample)
