"""Runs inside every spawned rank for tests/test_transformers_trainer.py: a converted Mixtral trained by
GraceTrainer (transformers' Trainer through DeepSpeed) against transformers' Trainer on the unmodified model,
same DeepSpeed JSON but the grace_moe section, same data order. On CPU over gloo (accelerate's state set up by
cpu_process_state); with GRACE_TEST_DEVICE=cuda over NCCL, accelerate's own GPU path, plus a bf16 case
(transformers refuses bf16 on a CPU run that uses DeepSpeed)."""
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist

from grace_ds.logical_nodes import join_logical_node
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology
from grace_ds.transformers_trainer import PROFILE_FILE
from tests.training_worker import DEVICE

STEPS, SAVE_AT = 6, 3


def main(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    _, backend = join_logical_node(rank, world, nodes, port, DEVICE.type)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
        report = check_trainer(rank, world, Topology.uniform(nodes, world // nodes), Path(out_dir))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def routing_plans(start: torch.nn.Module, topology: Topology, out: Path, samples: list[dict]) -> dict[str, Path]:
    """A GRACE plan with one replica slot per GPU from the model's own routing, and the contiguous layout."""
    from grace_ds.models import find_moe_blocks
    from grace_ds.routing_stats import RoutingStats

    model = copy.deepcopy(start)
    blocks = find_moe_blocks(model)
    recorder = RoutingStats(len(blocks), model.config.num_local_experts, model.config.num_experts_per_tok)
    recorder.attach_to_routers(blocks)
    with torch.no_grad():
        model(torch.stack([s["input_ids"] for s in samples[:16]]).to(DEVICE))
    recorder.detach()
    plans = {"grace": out / "plan-grace.json", "contiguous": out / "plan-contiguous.json"}
    if dist.get_rank() == 0:
        profile = recorder.to_profile(reduce=False)
        make_plan("grace", profile, topology, replica_slots=1).save(plans["grace"])
        make_plan("contiguous", profile, topology).save(plans["contiguous"])
    dist.barrier()
    return plans


def run_trainer(model, ds_config: dict, out: Path, samples: list[dict], grace: bool, **overrides):
    """One Trainer run (GraceTrainer when `grace`); returns the trainer after train()."""
    import transformers
    from accelerate.state import AcceleratorState

    from grace_ds.transformers_trainer import GraceTrainer, cpu_process_state

    AcceleratorState._reset_state(reset_partial_state=False)  # a fresh DeepSpeed plugin for this run's JSON
    settings = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=3e-3,
                    weight_decay=0.01, max_grad_norm=0.05, logging_steps=1, save_strategy="no", report_to=[],
                    disable_tqdm=True, seed=7, lr_scheduler_type="linear", warmup_steps=1)
    settings.update(cpu_process_state() if DEVICE.type == "cpu" else {}, **overrides)
    resume = settings.pop("resume_from_checkpoint", None)
    args = transformers.TrainingArguments(deepspeed=copy.deepcopy(ds_config), **settings)
    evaluated = samples[:16] if args.eval_strategy != "no" else None  # held apart from nothing: a fixed set
    trainer = (GraceTrainer if grace else transformers.Trainer)(model=model, args=args, train_dataset=samples,
                                                                eval_dataset=evaluated)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer) -> dict[int, dict[str, float]]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def check_trainer(rank: int, world: int, topology: Topology, out: Path) -> dict:
    from tests.tiny_models import tiny_model
    from tests.training_hf_worker import grouped_differences, hf_tensors

    generator = torch.Generator().manual_seed(3)
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (64, 12), generator=generator)]
    start = tiny_model("mixtral").to(DEVICE)
    start.config.output_router_logits = True  # the router's load-balancing loss trains too
    plans = routing_plans(start, topology, out, samples)
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}
    # torch_adam: torch's AdamW, not DeepSpeed's FusedAdam (a JIT-built CUDA op)
    ds_optimizer = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto",
                                                "torch_adam": True}}
    across = "hierarchical" if topology.num_nodes > 1 else "flat"
    cases = {  # name: (DeepSpeed JSON without grace_moe, exchange, Trainer overrides)
        "zero1/trainer-adamw/accumulation2": ({**zero, "zero_optimization": {"stage": 1}}, across,
                                              {"gradient_accumulation_steps": 2}),
        "zero2/config-adamw/evaluation": ({**zero, "zero_optimization": {"stage": 2}, "optimizer": ds_optimizer},
                                          across, {"eval_strategy": "steps", "eval_steps": 3}),
        "zero0/trainer-adamw/gradient-checkpointing": ({**zero, "zero_optimization": {"stage": 0}}, "flat",
                                                       {"gradient_checkpointing": True}),
    }
    if DEVICE.type == "cuda":
        cases["zero1/bf16"] = ({**zero, "zero_optimization": {"stage": 1}, "bf16": {"enabled": "auto"}}, across,
                               {"bf16": True})
    report = {"refused": check_refusals(start, plans["grace"], zero, out, samples)}
    for name, (ds_config, mode, overrides) in cases.items():
        tag = name.replace("/", "_")
        saving = dict(save_strategy="steps", save_steps=SAVE_AT) if name.startswith("zero1") else {}
        reference_model, recorder = copy.deepcopy(start), None
        section = {"plan": str(plans["grace"]), "communication": mode}
        if saving:  # the run's routing, recorded by GRACE and (on the unmodified model) by hooks on its routers
            recorder = routing_recorder(reference_model)
            section.update(profiling=True, profile_out=str(out / f"{tag}-profile.safetensors"))
        reference = run_trainer(reference_model, ds_config, out / f"{tag}-reference", samples, False,
                                **saving, **overrides)
        trainer = run_trainer(copy.deepcopy(start), {**ds_config, "grace_moe": section}, out / f"{tag}-grace",
                              samples, True, **saving, **overrides)
        want, got = losses(reference), losses(trainer)
        entry = {
            "steps": sorted(got),
            "loss": max(abs(got[s]["loss"] - want[s]["loss"]) for s in want),
            # The norm DeepSpeed clipped by, as Trainer logs it (DeepSpeed's fp32 engine without ZeRO logs none)
            "grad_norms": [got[s].get("grad_norm") for s in sorted(got)],
            "reference_grad_norms": [want[s].get("grad_norm") for s in sorted(want)],
            "weights": grouped_differences(hf_tensors(trainer.model, False, True),
                                           hf_tensors(reference.model, False, False)),
            "replicas_apart": trainer.grace_engine.max_replica_difference(),
            "replicated_experts": int((trainer.grace_runtime.plan.copies_per_expert() > 1).sum()),
            "moe_groups": sum(bool(g.get("moe")) for g in trainer.grace_engine.optimizer.param_groups),
            "first_loss": want[min(want)]["loss"],
            "weight_scale": max(float(t.abs().max()) for t in hf_tensors(reference.model, False, False).values()),
        }
        entry["eval_losses"] = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
        entry["reference_eval_losses"] = [(e["step"], e["eval_loss"]) for e in reference.state.log_history
                                          if "eval_loss" in e]
        figures = [{k: v for k, v in got[s].items() if k.startswith("grace_moe/")} for s in sorted(got)]
        entry["logged"] = figures
        entry["counted_cross_node_MB"] = counted_cross_node_MB(trainer, world)
        if name.startswith("zero0"):  # GraceTrainer(model="DIR"): each rank reads only its share of the checkpoint
            checkpoint = out / "start-checkpoint"
            if rank == 0:
                start.save_pretrained(checkpoint)
            dist.barrier()
            from_directory = run_trainer(str(checkpoint), {**ds_config, "grace_moe": section},
                                         out / f"{tag}-from-directory", samples, True, **overrides)
            read = from_directory.model.grace_load
            entry["from_directory"] = {
                "loss": max(abs(losses(from_directory)[s]["loss"] - want[s]["loss"]) for s in want),
                "weights": grouped_differences(hf_tensors(from_directory.model, False, True),
                                               hf_tensors(reference.model, False, False)),
                "skipped_expert_bytes": read.skipped_expert_bytes}
        if saving:
            reference.save_model()
            trainer.save_model()
            entry.update(check_saved(out / f"{tag}-reference", out / f"{tag}-grace", rank))
            entry["profile"] = check_profiles(recorder, out / f"{tag}-profile.safetensors",
                                              out / f"{tag}-grace" / f"checkpoint-{SAVE_AT}" / PROFILE_FILE)
            # Re-planned from checkpoint-3's own routing (two replica slots a GPU) and resumed there: the slots and
            # their optimizer states follow.
            replanned = out / f"{tag}-replanned.json"
            if rank == 0:
                profile = RoutingProfile.load(out / f"{tag}-grace" / f"checkpoint-{SAVE_AT}" / PROFILE_FILE)
                make_plan("grace", profile, topology, replica_slots=2).save(replanned)
            dist.barrier()
            resumed = run_trainer(copy.deepcopy(start), {**ds_config, "grace_moe": {**section, "plan": str(replanned),
                                                                                    "profiling": False}},
                                  out / f"{tag}-grace", samples, True, **overrides,
                                  resume_from_checkpoint=str(out / f"{tag}-grace" / f"checkpoint-{SAVE_AT}"))
            after = losses(resumed)
            entry["resumed"] = {
                "steps": sorted(after),  # 1-3 from the checkpoint's trainer_state.json, 4-6 trained here
                "loss": max(abs(after[s]["loss"] - want[s]["loss"]) for s in after if s > SAVE_AT),
                "weights": grouped_differences(hf_tensors(resumed.model, False, True),
                                               hf_tensors(reference.model, False, False)),
                "plan": resumed.grace_runtime.plan.policy,
                "slots_per_gpu": [trainer.grace_runtime.plan.slots_per_gpu, resumed.grace_runtime.plan.slots_per_gpu],
            }
        report[name] = entry
        dist.barrier()
    report["accelerate-loop"] = check_accelerate_loop(start, plans["grace"], across, samples)
    return report


def routing_recorder(model):
    from grace_ds.models import find_moe_blocks
    from grace_ds.routing_stats import RoutingStats

    blocks = find_moe_blocks(model)
    recorder = RoutingStats(len(blocks), model.config.num_local_experts, model.config.num_experts_per_tok)
    return recorder.attach_to_routers(blocks)


def check_profiles(recorder, final: Path, at_checkpoint: Path) -> dict:
    """GRACE's profiles of the run (profile_out at the end, checkpoint-3's) against the routing hooks on the
    unmodified model's routers over the same steps: the same tokens, the same per-expert loads."""
    want = recorder.to_profile()  # reduced over the job's ranks, as GRACE's
    got, half = RoutingProfile.load(final), RoutingProfile.load(at_checkpoint)
    return {"tokens": got.num_tokens.tolist(), "reference_tokens": want.num_tokens.tolist(),
            "checkpoint_tokens": half.num_tokens.tolist(),
            "load_difference": float((got.expert_load - want.expert_load).abs().sum() / want.expert_load.sum())}


def check_accelerate_loop(start, plan: Path, mode: str, samples: list[dict]) -> dict:
    """A training loop written with accelerate: GraceAccelerator on the converted model against Accelerator on the
    unmodified one, same JSON less the section (ZeRO 2, torch's AdamW, clipping), same sharded batches."""
    from tests.training_hf_worker import grouped_differences, hf_tensors

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.05,
                 "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    runs = {}
    for grace in (False, True):
        config = {**ds_config, "grace_moe": {"plan": str(plan), "communication": mode}} if grace else ds_config
        runs[grace] = run_loop(copy.deepcopy(start), config, samples, grace)
    (_, want_losses, want_model, _), (accelerator, got_losses, got_model, figures) = runs[False], runs[True]
    return {"losses": len(got_losses), "loss": max(abs(a - b) for a, b in zip(got_losses, want_losses)),
            "first_loss": want_losses[0],
            "weights": grouped_differences(hf_tensors(got_model, False, True), hf_tensors(want_model, False, False)),
            "replicas_apart": accelerator.grace_engine.max_replica_difference(), "figures": figures}


def run_loop(model, ds_config: dict, samples: list[dict], grace: bool):
    """STEPS optimizer steps of a plain accelerate loop; (accelerator, per-step losses, the model, GRACE figures)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    from grace_ds.hf_accelerate import GraceAccelerator, cpu_process_state

    AcceleratorState._reset_state(reset_partial_state=False)
    if DEVICE.type == "cpu":
        cpu_process_state()
    accelerator = (GraceAccelerator if grace else Accelerator)(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=copy.deepcopy(ds_config)))
    if grace:
        model = accelerator.convert(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(samples, batch_size=2)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    for _, batch in zip(range(STEPS), loader):
        loss = engine(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return accelerator, losses, model, accelerator.grace_figures() if grace else {}


def check_refusals(start, plan: Path, zero: dict, out: Path, samples: list[dict]) -> dict[str, str]:
    """GraceTrainer's construction under what it cannot train: the message each refusal gives."""
    import transformers
    from accelerate.state import AcceleratorState

    from grace_ds.errors import GraceInputError
    from grace_ds.transformers_trainer import GraceTrainer, cpu_process_state

    dense = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    section = {"grace_moe": {"plan": str(plan)}}
    cases = {  # name: (model, DeepSpeed JSON, TrainingArguments keywords, accelerate's state over gloo)
        "zero3": (start, {**zero, "zero_optimization": {"stage": 3}, **section}, {}, True),
        "dense model": (dense, {**zero, "zero_optimization": {"stage": 1}, **section}, {}, True),
        "save on each node": (start, {**zero, "zero_optimization": {"stage": 1}, **section},
                              {"save_on_each_node": True}, True),
    }
    if DEVICE.type == "cpu" and dist.get_world_size() > 1:  # accelerate's own state on CPU: one process of the job
        cases["one process of the job"] = (start, {**zero, "zero_optimization": {"stage": 1}, **section}, {}, False)
    messages = {}
    for name, (model, ds_config, keywords, configured) in cases.items():
        AcceleratorState._reset_state(reset_partial_state=False)
        args = transformers.TrainingArguments(output_dir=str(out / "refused"), deepspeed=ds_config, report_to=[],
                                              per_device_train_batch_size=2, **keywords,
                                              **(cpu_process_state() if configured and DEVICE.type == "cpu" else {}))
        try:
            GraceTrainer(model=copy.deepcopy(model), args=args, train_dataset=samples)
            messages[name] = "accepted"
        except GraceInputError as error:
            messages[name] = str(error)
    return messages


def counted_cross_node_MB(trainer, world: int) -> float:
    """What the runtime counted over the whole run, per rank and step: the logged intervals must sum to it."""
    total = torch.tensor([sum(t.cross_node_bytes for t in trainer.grace_runtime.traffic)], dtype=torch.float64,
                         device=DEVICE)
    dist.all_reduce(total)
    return float(total) / world / trainer.state.global_step / 1e6


def check_saved(reference_dir: Path, grace_dir: Path, rank: int) -> dict:
    """The exported checkpoints (checkpoint-3's model files and the final save_model) against transformers'
    own from the unmodified run, both loaded without GRACE by from_pretrained."""
    import transformers

    from grace_ds.checkpoint_layout import LAYOUT_FILE

    out: dict = {}
    if rank == 0:
        for label, sub in (("checkpoint", f"checkpoint-{SAVE_AT}"), ("final", ".")):
            loaded = transformers.AutoModelForCausalLM.from_pretrained(grace_dir / sub)
            want = transformers.AutoModelForCausalLM.from_pretrained(reference_dir / sub).state_dict()
            got = loaded.state_dict()
            out[f"saved_{label}"] = {"class": type(loaded).__name__, "same_names": sorted(got) == sorted(want),
                                     "difference": max(float((got[k] - want[k]).abs().max()) for k in want)}
        out["layout_record"] = (grace_dir / f"checkpoint-{SAVE_AT}" / f"global_step{SAVE_AT}" / LAYOUT_FILE).is_file()
    dist.barrier()
    return out
