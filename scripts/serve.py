"""Serve a transformers MoE checkpoint with GRACE-MoE under the deepspeed launcher, and check it.

Each rank takes its own share of a fixed batch (data-parallel attention, expert-parallel MoE), runs it
through `grace_ds.init_inference` with the DeepSpeed JSON given, and (with --check) compares its logits
with the unmodified model's on the same rows. Launch with scripts/launch.sh.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="transformers checkpoint directory")
    parser.add_argument("--config", required=True, help="DeepSpeed JSON with a grace_moe section")
    parser.add_argument("--sequences-per-rank", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--check", action="store_true", help="compare with the unmodified model")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args()

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.errors import GraceInputError
    from grace_ds.profiling import load_model

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", args.local_rank))))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        model, _ = load_model(args.model)
        with open(args.config) as handle:
            config = json.load(handle)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (world * args.sequences_per_rank, args.sequence_length),
                            generator=generator)
        mine = ids[rank * args.sequences_per_rank:(rank + 1) * args.sequences_per_rank].to(device)
        reference = None
        if args.check:
            with torch.no_grad():
                reference = copy.deepcopy(model).to(device)(mine).logits
        engine = grace_deepspeed.init_inference(model.to(device), config)
        with torch.no_grad():
            engine(mine)  # warm-up
            start = time.perf_counter()
            logits = engine(mine).logits
            elapsed = time.perf_counter() - start
        line = {"rank": rank, "world": world, "topology": engine.grace_runtime.plan.topology.describe(),
                "comm": engine.grace_runtime.comm_mode, "forward_ms": round(elapsed * 1e3, 2)}
        if reference is not None:
            line["max_abs_diff"] = float((logits - reference).abs().max())
            line["relative"] = float((logits - reference).abs().max() / reference.abs().max())
        print("GRACE_SERVE " + json.dumps(line), flush=True)
        torch.distributed.barrier()
        ok = reference is None or line["relative"] < 1e-4
        return 0 if ok else 1
    except GraceInputError as error:
        print(f"serve: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
