"""The MoE layers the GPU benchmark compares, all fed the same replayed routing.

Every variant computes gate -> top-k -> routed experts (+ shared experts) on this rank's tokens. The gate
is a real [E, H] linear layer whose logits get a large bias on the recorded experts, so the recorded
top-k is what DeepSpeed's TopKGate and GRACE's top-k both pick, through their own code.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from grace_ds.experts import SlotExperts
from grace_ds.runtime import GraceRuntime

REPLAY_BIAS = 30.0  # logits gap that makes the recorded experts the top-k whatever the random gate says


@dataclass(frozen=True)
class LayerShape:
    name: str
    hidden: int
    inter: int  # per routed expert (SwiGLU)
    num_experts: int
    top_k: int
    shared_inter: int = 0  # shared experts fused into one SwiGLU MLP of this width (0: none)


class Stopwatch:
    """Intervals on the device's own clock: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.intervals: list[tuple] = []

    def start(self):
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # inside a CUDA graph capture: replays are timed as a whole
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started) -> None:
        if started is None:
            return
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.intervals.append((started, event))
        else:
            self.intervals.append((started, time.perf_counter()))

    def milliseconds(self) -> list[float]:
        """Every interval so far, then forgets them; waits for the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out = [a.elapsed_time(b) for a, b in self.intervals]
        else:
            out = [(b - a) * 1e3 for a, b in self.intervals]
        self.intervals = []
        return out


class SwiGLU(nn.Module):
    """One expert as DeepSpeed users write it (also the fused shared experts)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def timed(forward, x, iters: int, warmup: int, device: torch.device, after=None) -> list[float]:
    """Per-iteration time in ms of forward(x) on this rank, each iteration started together on all
    ranks; `after()` runs between iterations, untimed."""
    watch = Stopwatch(device)
    with torch.no_grad():
        for i in range(warmup + iters):
            dist.barrier()
            started = watch.start()
            forward(x)
            watch.stop(started)
            if after is not None:
                after()
            if i < warmup:
                watch.milliseconds()
    return watch.milliseconds()


# Variants are timed together, round-robin: this many rounds, each giving every (variant, batch) iters /
# rounds forwards in turn, so that the cross-node link's drift during a run falls on all of them alike
# rather than on whichever ran in a slow minute.
TIMING_ROUNDS = 4


def round_robin(entries: int, iters: int, warmup: int, run) -> None:
    """run(entry, iters, warmup) for every entry in turn, TIMING_ROUNDS rounds (fewer when iters is
    smaller) sharing the iters; `warmup` forwards before the first round's, one before each later's."""
    rounds = min(TIMING_ROUNDS, iters)
    for round_ in range(rounds):
        for entry in range(entries):
            run(entry, iters // rounds + (round_ < iters % rounds), warmup if round_ == 0 else 1)


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's sync debug mode says this at every host wait


def host_tail_ms(forward, x, iters: int, device: torch.device) -> list[float]:
    """Per iteration, the host time in ms from forward(x)'s last synchronisation with the device to its
    return (all of it when there is none): the launches the device's work can overlap. On a CPU the
    host does the work itself, so there is no such time: zeros."""
    if device.type != "cuda":
        return [0.0] * iters
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return tails_after_sync_warnings(forward, x, iters, lambda: torch.cuda.synchronize(device))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def tails_after_sync_warnings(forward, x, iters: int, drain,
                              clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """host_tail_ms's clock: torch raises a C++ warning as a Python one when the call that synchronised
    returns, so the last warning's moment is where the host stopped waiting. `drain()` empties the
    device's queues before each iteration (untimed). `clock()`: seconds (a test passes one it advances)."""
    tails = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
        warned: list[float] = []
        show = warnings.showwarning

        def note(message, *args, **kwargs) -> None:
            if SYNC_WARNING in str(message):
                warned.append(clock())
            else:
                show(message, *args, **kwargs)

        warnings.showwarning = note  # catch_warnings puts the original back
        for _ in range(iters):
            drain()
            warned.clear()
            started = clock()
            forward(x)
            ended = clock()
            tails.append((ended - max(warned, default=started)) * 1e3)
    return tails


def slowest_rank(values: list[float], device: torch.device) -> list[float]:
    """Element-wise max over ranks (an iteration ends when its slowest rank does)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def summed(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def keep(results: list[dict], record: dict, rank: int, label: str) -> None:
    """Adds a result; rank 0 prints it as it comes (long runs show progress)."""
    results.append(record)
    if rank == 0:
        print(f"{label:<90} {record['median_ms']:9.3f} ms", flush=True)


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next variant's weights get the memory back


def replay_bias(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E] float32: REPLAY_BIAS on each token's recorded experts, 0 elsewhere."""
    bias = torch.zeros(topk_ids.shape[0], num_experts, device=topk_ids.device)
    return bias.scatter_(1, topk_ids.long(), REPLAY_BIAS)


class TimedSlotExperts(SlotExperts):
    """SlotExperts whose expert work (grouped GEMMs, permute and unpermute) counts as the GPU's busy time."""

    busy: Stopwatch

    def forward(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        started = self.busy.start()
        out = super().forward(rows, slot)
        self.busy.stop(started)
        return out

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False) -> torch.Tensor:
        started = self.busy.start()
        out = super().weighted_sum(rows, pair_row, pair_slot, pair_weight, pairs_by_row)
        self.busy.stop(started)
        return out


class GraceLayer(nn.Module):
    """Gate + GRACE routed experts (grouped GEMM over this rank's slots) + shared experts."""

    def __init__(self, shape: LayerShape, runtime: GraceRuntime, device: torch.device, dtype: torch.dtype,
                 busy: Stopwatch) -> None:
        super().__init__()
        self.shape, self.runtime = shape, runtime
        self.gate = nn.Linear(shape.hidden, shape.num_experts, bias=False, device=device)  # fp32, as DeepSpeed's
        self.slots = TimedSlotExperts(runtime.local_slots(0), shape.hidden, shape.inter, F.silu, dtype, device)
        self.slots.busy = busy
        with torch.no_grad():
            self.slots.gate_up_proj.normal_(0, shape.hidden ** -0.5)
            self.slots.down_proj.normal_(0, shape.inter ** -0.5)
        self.shared = SwiGLU(shape.hidden, shape.shared_inter).to(device, dtype) if shape.shared_inter else None
        self.bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate.weight) + self.bias
        weights, ids = torch.topk(logits.softmax(-1), self.shape.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = self.runtime.route_and_compute(0, x, ids, weights, self.slots)
        return out + self.shared(x) if self.shared is not None else out


def deepspeed_layer(shape: LayerShape, ep_size: int, device: torch.device, dtype: torch.dtype,
                    busy: Stopwatch) -> nn.Module:
    """deepspeed.moe.layer.MoE, dropless, with the replayed gate; shared experts beside it."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import TopKGate

    class ReplayTopKGate(TopKGate):
        """TopKGate whose logits carry the replay bias; the rest is DeepSpeed's own gating."""

        def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
            from deepspeed.moe import sharded_moe

            logits = F.linear(input.float(), self.wg.weight.float()) + self.replay_bias
            if self.k == 1:
                return sharded_moe.top1gating(logits, self.eval_capacity_factor, self.min_capacity, used_token, None,
                                              self.drop_tokens, self.use_rts, self.ep_group, sparse_routes, use_tutel)
            if self.k == 2:
                return sharded_moe.top2gating(logits, self.eval_capacity_factor, self.min_capacity, self.drop_tokens,
                                              self.ep_group, self.top2_2nd_expert_sampling, sparse_routes)
            return sharded_moe.topkgating(logits, self.k, self.eval_capacity_factor, self.min_capacity,
                                          self.drop_tokens, self.ep_group, sparse_routes=sparse_routes)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = MoE(shape.hidden, SwiGLU(shape.hidden, shape.inter), shape.num_experts, ep_size=ep_size,
                           k=shape.top_k, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
            self.moe.deepspeed_moe.gate.__class__ = ReplayTopKGate
            self.shared = SwiGLU(shape.hidden, shape.shared_inter) if shape.shared_inter else None
            self.capacity = 0
            experts = self.moe.deepspeed_moe.experts
            experts.register_forward_pre_hook(lambda module, args: setattr(self, "_busy_start", busy.start()))
            experts.register_forward_hook(lambda module, args, out: busy.stop(self._busy_start))
            # The padded capacity DeepSpeed chose: combine_weights [S, E, C], or the capacity itself
            # when the gate returns sparse routes.
            self.moe.deepspeed_moe.gate.register_forward_hook(
                lambda module, args, out: setattr(self, "capacity", int(out[1].shape[-1]) if out[1].dim() == 3
                                                  else int(out[1])))

        @property
        def bias(self):
            return self.moe.deepspeed_moe.gate.replay_bias

        @bias.setter
        def bias(self, value):
            self.moe.deepspeed_moe.gate.replay_bias = value

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.moe(x)[0]
            return out + self.shared(x) if self.shared is not None else out

    layer = Layer()
    gate_weight = layer.moe.deepspeed_moe.gate.wg.weight.data.clone()
    layer.to(device, dtype)
    layer.moe.deepspeed_moe.gate.wg.weight.data = gate_weight.to(device)  # the gate stays fp32
    layer.moe.set_deepspeed_parallelism()
    layer.bias = None
    return layer


def megatron_layer(shape: LayerShape, ep_size: int, device: torch.device, dtype: torch.dtype,
                   busy: Stopwatch) -> nn.Module:
    """megatron-core's MoELayer with its alltoall dispatcher (dropless) and its local SequentialMLP
    experts (its grouped-GEMM experts need Transformer Engine or grouped_gemm, absent here), the replayed
    gate; shared experts are megatron's own."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ep_size)
    on_gpu = device.type == "cuda"
    if on_gpu:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(7)
    config = TransformerConfig(
        num_layers=1, hidden_size=shape.hidden, ffn_hidden_size=shape.inter, moe_ffn_hidden_size=shape.inter,
        num_attention_heads=16, num_moe_experts=shape.num_experts, moe_router_topk=shape.top_k,
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        use_cpu_initialization=not on_gpu, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        expert_model_parallel_size=ep_size, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_shared_expert_intermediate_size=shape.shared_inter or None)
    spec = get_gpt_layer_local_spec(num_experts=shape.num_experts, moe_grouped_gemm=False)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = spec.submodules.mlp(config, layer_number=1).to(device)
            self.bias = None
            self._gating = self.moe.router.gating
            self.moe.router.gating = self._replayed_gating
            self.moe.experts.register_forward_pre_hook(lambda module, args: setattr(self, "_busy", busy.start()))
            self.moe.experts.register_forward_hook(lambda module, args, out: busy.stop(self._busy))
            self.moe.router.register_forward_hook(lambda module, args, out: setattr(self, "routing_map", out[1]))

        def _replayed_gating(self, x: torch.Tensor) -> torch.Tensor:
            logits = self._gating(x)  # [sequence, batch, E]: the bias is [tokens, E]
            return logits.float() + self.bias.view(logits.shape)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.moe(x.unsqueeze(1))[0].squeeze(1)  # megatron takes [sequence, batch, hidden]

    return Layer()


def autoep_layer(shape: LayerShape, ep_size: int, device: torch.device, dtype: torch.dtype,
                 busy: Stopwatch) -> nn.Module:
    """DeepSpeed AutoEP (0.19.8): a transformers OLMoE sparse block at the shape (gate + fused experts), which
    `deepspeed.initialize` swaps for its AutoEPMoELayer (custom module patterns: AutoEP has no OLMoE
    preset); its router's gate logits get the replay bias; shared experts beside it as in the others."""
    import deepspeed
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = OlmoeConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_experts=shape.num_experts,
                         num_experts_per_tok=shape.top_k, norm_topk_prob=False)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config  # AutoEP reads top-k and expert count from the model's config
            self.mlp = OlmoeSparseMoeBlock(config)
            self.shared = SwiGLU(shape.hidden, shape.shared_inter) if shape.shared_inter else None
            self.bias = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.mlp(x.unsqueeze(0))
            out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
            return out + self.shared(x) if self.shared is not None else out

    layer = Layer().to(device, dtype)
    engine, *_ = deepspeed.initialize(model=layer, config={
        "train_micro_batch_size_per_gpu": 1,  # no precision section: the layer is already in dtype, no optimizer
        "expert_parallel": {"enabled": True, "autoep_size": ep_size, "moe_layer_pattern": "mlp",
                            "router_pattern": "gate", "expert_pattern": "experts"}})
    layer = engine.module
    moe = layer.mlp
    if type(moe).__name__ != "AutoEPMoELayer":
        raise RuntimeError(f"AutoEP left the block as {type(moe).__name__}")
    moe.router.gate.register_forward_hook(lambda module, args, out: out + layer.bias.to(out.dtype))
    moe.router.register_forward_hook(lambda module, args, out: setattr(layer, "selected_experts", out[1]))
    moe.experts.register_forward_pre_hook(lambda module, args: setattr(layer, "_busy", busy.start()))
    moe.experts.register_forward_hook(lambda module, args, out: busy.stop(layer._busy))
    return layer
