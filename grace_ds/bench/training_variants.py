"""The training benchmark's variants: DeepSpeed MoE blocks (and GraceMoE in their place), the transformers
model as it is or converted, each built into a DeepSpeed engine; and the counter of bytes on the wire."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from grace_ds.bench.provenance import ROOT
from grace_ds.exchange.traffic import Traffic

MODEL_DIR = ROOT / "grace_ds" / "examples" / "default_model"
VARIANTS = ("deepspeed-moe", "deepspeed-moe/noise", "grace-contiguous", "grace", "transformers", "transformers/noise",
            "transformers-grace")
# Which variant each one must train like.
REFERENCE = {"deepspeed-moe/noise": "deepspeed-moe", "grace-contiguous": "deepspeed-moe", "grace": "deepspeed-moe",
             "transformers/noise": "transformers", "transformers-grace": "transformers"}
# A top-k choice between near-tied experts flips under any rounding difference, and the runs part from there:
# the /noise controls are the reference with every weight moved by about one float32 rounding (relative 2^-24),
# the yardstick for "equal within floating-point noise".
NOISE = 2.0 ** -24


class WireBytes:
    """Counts what this rank hands to torch.distributed's all_to_all_single and all_reduce (DeepSpeed and
    grace_ds both call them through the module attribute); all_to_all bytes split by the peer's logical
    node as the runtime's own Traffic counts them."""

    def __init__(self, node_of_gpu: list[int]) -> None:
        self.node_of_gpu = node_of_gpu
        self.exchange, self.all_reduce = Traffic(), 0
        self._originals = (dist.all_to_all_single, dist.all_reduce)

    def install(self) -> None:
        all_to_all_single, all_reduce = self._originals

        def counted_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                               async_op=False):
            self._count_all_to_all(input, input_split_sizes, group)
            return all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                     async_op=async_op)

        def counted_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if dist.get_world_size(group) > 1:  # a group of one moves nothing
                self.all_reduce += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_to_all_single, dist.all_reduce = counted_all_to_all, counted_all_reduce

    def uninstall(self) -> None:
        dist.all_to_all_single, dist.all_reduce = self._originals

    def _count_all_to_all(self, input: torch.Tensor, splits, group) -> None:
        peers = dist.get_world_size(group)
        row_bytes = math.prod(input.shape[1:]) * input.element_size()  # a rank may send no rows at all
        if splits is None:  # even splits: the first dimension in equal parts
            splits = [(input.shape[0] if input.dim() else input.numel()) // peers] * peers
        bytes_to = [0] * dist.get_world_size()
        for peer, rows in enumerate(splits):
            bytes_to[dist.get_global_rank(group, peer) if group is not None else peer] += rows * row_bytes
        self.exchange.add_sent(bytes_to, dist.get_rank(), self.node_of_gpu)

    def reset(self) -> None:
        self.exchange, self.all_reduce = Traffic(), 0


class GatedExpert(torch.nn.Module):
    """One OLMoE expert as a module DeepSpeed's MoE copies: down(silu(gate) * up)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(hidden, 2 * inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


class DeepSpeedBlock(torch.nn.Module):
    """Stands in for a transformers MoE block: a DeepSpeed-style MoE layer (DeepSpeed's or GraceMoE), keeping
    its l_aux and expert counts for the loss and the load report."""

    def __init__(self, moe: torch.nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.l_aux = torch.zeros(())
        self.exp_counts: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out, self.l_aux, self.exp_counts = self.moe(hidden)
        return out


def load_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, local_files_only=True)


def expert_state_dicts(block) -> list[dict[str, torch.Tensor]]:
    """GatedExpert state dicts of a transformers block's fused experts."""
    experts = block.experts
    return [{"gate_up.weight": experts.gate_up_proj[e].detach().clone(), "down.weight": experts.down_proj[e].detach().clone()}
            for e in range(experts.gate_up_proj.shape[0])]


def deepspeed_model(variant: str, world: int, plans: dict[str, str], device: torch.device):
    """The embedded model with its MoE blocks as DeepSpeed MoE layers (deepspeed-moe) or GraceMoE (the others)."""
    from deepspeed.moe.layer import MoE

    from grace_ds.deepspeed_moe import GraceMoE
    from grace_ds.plan import PlacementPlan
    from grace_ds.runtime import GraceRuntime

    model = load_model()
    config = model.config
    hidden, inner, experts, k = config.hidden_size, config.intermediate_size, config.num_experts, config.num_experts_per_tok
    gate = dict(k=k, capacity_factor=1.0, min_capacity=4, drop_tokens=False, use_rts=False)
    runtime = None
    if variant.startswith("grace"):
        policy, mode = ("contiguous", "flat") if variant == "grace-contiguous" else ("grace", "hierarchical")
        runtime = GraceRuntime(PlacementPlan.load(plans[policy]), communication=mode, device=device)
        runtime.measure = True  # pairs computed per layer, for the load report
    rank = dist.get_rank()
    for index, layer in enumerate(model.model.layers):
        block = layer.mlp
        if runtime is None:
            moe = MoE(hidden, GatedExpert(hidden, inner), experts, ep_size=world, top2_2nd_expert_sampling=False, **gate)
        else:
            moe = GraceMoE(hidden, GatedExpert(hidden, inner), experts, runtime, index, ep_size=world, **gate)
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(block.gate.weight)
            states = expert_state_dicts(block)
            if runtime is None:
                per_rank = experts // world
                for local, module in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                    module.load_state_dict(states[rank * per_rank + local])
            else:
                moe.deepspeed_moe.load_logical_experts(states)
        layer.mlp = DeepSpeedBlock(moe)
    return model.to(device), runtime


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Every weight times (1 + NOISE * n), n standard normal, the same draws on every rank (data-parallel
    weights stay equal across ranks)."""
    generator = torch.Generator().manual_seed(1234)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
        param.mul_(1 + NOISE * noise)


def engine_for(variant: str, world: int, plans: dict[str, str], args, device: torch.device):
    """(DeepSpeed engine, its GraceRuntime or None, the DeepSpeedBlocks or [])."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import grace_ds.deepspeed as grace_deepspeed

    config = {"train_micro_batch_size_per_gpu": args.sequences_per_rank, "gradient_clipping": args.clip,
              "zero_optimization": {"stage": args.zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}

    def optimizer(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    if variant.startswith("transformers"):
        model = load_model().to(device)
        if variant.endswith("/noise"):
            perturb(model)
        if variant.startswith("transformers/"):
            variant = "transformers"
        if variant == "transformers":
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model.parameters()), config=config)
            return engine, None, []
        config["grace_moe"] = {"plan": plans["grace"], "communication": "hierarchical"}
        engine, *_ = grace_deepspeed.initialize(model, config, optimizer=optimizer)
        from grace_ds.deepspeed_training import runtimes_of

        runtime = runtimes_of(engine.module)[0]
        runtime.measure = True
        return engine, runtime, []
    model, runtime = deepspeed_model(variant.removesuffix("/noise"), world, plans, device)
    if variant.endswith("/noise"):
        perturb(model)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    if runtime is None:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(groups), config=config)
    else:
        engine, *_ = grace_deepspeed.initialize(model, config, optimizer=optimizer(groups))
    blocks = [m for m in engine.module.modules() if isinstance(m, DeepSpeedBlock)]
    return engine, runtime, blocks

