"""Serve a transformers MoE checkpoint with GRACE-MoE under the deepspeed launcher, check and measure it.

Each rank takes its own share of a fixed batch of prompts (data-parallel attention, expert-parallel MoE),
runs it through `grace_ds.init_inference` with the DeepSpeed JSON given: one prefill, then greedy decode
steps. With --check it compares logits and generated text with the unmodified model on the same rows;
with --report, rank 0 writes the job's figures (tokens/s, MoE-layer time, bytes, loads) as JSON.
Launch with scripts/launch.sh.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def prompts(args, vocab_size: int, world: int) -> torch.Tensor:
    """[world * sequences_per_rank, sequence_length]: slices of a text file (bytes), else random ids."""
    count = world * args.sequences_per_rank
    if args.prompts_file:
        data = torch.frombuffer(bytearray(Path(args.prompts_file).read_bytes()), dtype=torch.uint8).long()
        stride = max(1, (data.numel() - args.sequence_length) // count)
        return torch.stack([data[i * stride:i * stride + args.sequence_length] for i in range(count)]) % vocab_size
    return torch.randint(0, vocab_size, (count, args.sequence_length), generator=torch.Generator().manual_seed(0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="transformers checkpoint directory")
    parser.add_argument("--config", required=True, help="DeepSpeed JSON with a grace_moe section")
    parser.add_argument("--sequences-per-rank", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--prompts-file", help="take prompts from this file's bytes (byte-level models)")
    parser.add_argument("--new-tokens", type=int, default=0, help="greedy decode steps after the prefill")
    parser.add_argument("--check", action="store_true", help="compare with the unmodified model")
    parser.add_argument("--report", help="rank 0 writes the job's measurements here (JSON)")
    parser.add_argument("--label", default="grace")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args()

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.errors import GraceInputError
    from grace_ds.models.rank_load import checkpoint_config
    from grace_ds.profiling import load_model

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", args.local_rank))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        with open(args.config) as handle:
            config = json.load(handle)
        ids = prompts(args, checkpoint_config(args.model).vocab_size, world)
        mine = ids[rank * args.sequences_per_rank:(rank + 1) * args.sequences_per_rank].to(device)
        generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
        reference = reference_text = None
        if args.check:  # the unmodified model, whole, on this rank: only for the comparison
            plain = load_model(args.model)[0].to(device)
            with torch.no_grad():
                reference = plain(mine).logits
                if args.new_tokens:
                    reference_text = plain.generate(mine, **generate)[:, mine.shape[1]:]
            del plain
        # From the directory: this rank reads the dense weights and its slots' experts only.
        engine = grace_deepspeed.init_inference(args.model, config)
        runtime = engine.grace_runtime
        print(f"rank {rank}: {engine.grace_load.describe()}", flush=True)
        with torch.no_grad():
            engine(mine)  # warm-up
            runtime.measure = True
            start = time.perf_counter()
            logits = engine(mine).logits
            prefill_seconds = time.perf_counter() - start
            runtime.measure = False
            decode_seconds, text = 0.0, None
            if args.new_tokens:
                start = time.perf_counter()
                text = engine.module.generate(mine, **generate)[:, mine.shape[1]:]
                decode_seconds = time.perf_counter() - start
        line = {"rank": rank, "world": world, "topology": runtime.plan.topology.describe(), "comm": runtime.modes_used(),
                "comm_resolved": runtime.comm_mode, "forward_ms": round(prefill_seconds * 1e3, 2),
                "read_bytes": engine.grace_load.read_bytes,
                "checkpoint_bytes": engine.grace_load.read_bytes + engine.grace_load.skipped_expert_bytes}
        if reference is not None:
            line["max_abs_diff"] = float((logits - reference).abs().max())
            line["relative"] = float((logits - reference).abs().max() / reference.abs().max())
            if text is not None:
                line["text_equal"] = bool(torch.equal(text, reference_text))
        print("GRACE_SERVE " + json.dumps(line), flush=True)
        if args.report:
            write_report(args, runtime, line, prefill_seconds, decode_seconds, mine, text, world, rank, device)
        torch.distributed.barrier()
        ok = reference is None or (line["relative"] < 1e-4 and line.get("text_equal", True))
        return 0 if ok else 1
    except GraceInputError as error:
        print(f"serve: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.distributed.destroy_process_group()


def write_report(args, runtime, line, prefill_seconds, decode_seconds, mine, text, world, rank, device) -> None:
    """Gather every rank's per-layer figures; rank 0 writes the job's report."""
    mine_stats = torch.tensor([[t.cross_node_bytes, t.intra_node_bytes, t.pairs_computed, s]
                               for t, s in zip(runtime.traffic, runtime.seconds)], dtype=torch.float64, device=device)
    scalars = torch.tensor([prefill_seconds, decode_seconds, line.get("max_abs_diff", float("nan")),
                            float(line.get("text_equal", True)), line["read_bytes"], line["checkpoint_bytes"]],
                           dtype=torch.float64, device=device)
    stats = [torch.empty_like(mine_stats) for _ in range(world)]
    every = [torch.empty_like(scalars) for _ in range(world)]
    torch.distributed.all_gather(stats, mine_stats)
    torch.distributed.all_gather(every, scalars)
    if rank != 0:
        return
    stats, every = torch.stack(stats).cpu(), torch.stack(every).cpu()  # [world, L, 4], [world, 6]
    pairs = stats[:, :, 2]
    prefill_tokens = mine.numel() * world
    report = {
        "label": args.label, "policy": runtime.plan.policy, "comm": runtime.modes_used(),
        "topology": runtime.plan.topology.describe(), "router": runtime.served.router.policy, "device": device.type,
        "prefill_tokens": prefill_tokens, "prefill_tokens_per_s": prefill_tokens / float(every[:, 0].max()),
        "decode_tokens_per_s": (args.new_tokens * mine.shape[0] * world / float(every[:, 1].max())
                                if args.new_tokens else None),
        "moe_seconds_per_layer": stats[:, :, 3].max(0).values.tolist(),
        "cross_node_bytes_per_layer": stats[:, :, 0].sum(0).tolist(),
        "intra_node_bytes_per_layer": stats[:, :, 1].sum(0).tolist(),
        "pairs_per_gpu_per_layer": pairs.T.tolist(),
        "max_over_mean_gpu_load_per_layer": (pairs.max(0).values / pairs.mean(0)).tolist(),
        "max_abs_logit_diff": float(every[:, 2].max()), "generated_text_equal": bool(every[:, 3].min() > 0),
        "generated_bytes_rank0": text[0].tolist() if text is not None else None,
        "checkpoint_bytes": float(every[0, 5]), "checkpoint_bytes_read_per_rank": every[:, 4].tolist(),
    }
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
