"""Train the embedded default model: an OLMoE-architecture MoE (64 experts, top-8, byte vocabulary) on
the Python standard library's sources, with DeepSpeed and the grace_moe profiling hooks on.

Writes the checkpoint (safetensors + config) to grace_ds/examples/default_model/, and the loss curve, held-out
perplexity and a routing report to docs/default-model.* . Usage:
    python scripts/train_tiny_moe.py [--steps 1500] [--config configs/ds_train_tiny.json]
Runs on CPU (gloo, one rank) or a GPU, under the deepspeed launcher or plain python.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def model_config():
    from transformers import OlmoeConfig

    # Sized so the fp32 checkpoint stays under 16 MB: 4 layers x 64 experts of 96 -> 48 -> 96.
    return OlmoeConfig(vocab_size=256, hidden_size=96, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                       max_position_embeddings=256, router_aux_loss_coef=0.01, output_router_logits=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)


def batches(data: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
        yield torch.stack([data[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model, data: torch.Tensor, length: int, device, max_sequences: int = 64) -> float:
    sequences = data[: (data.numel() // length) * length].view(-1, length)[:max_sequences].to(device)
    losses = [float(model(sequences[i:i + 8], labels=sequences[i:i + 8]).loss) for i in range(0, sequences.shape[0], 8)]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--config", default=str(ROOT / "configs" / "ds_train_tiny.json"))
    parser.add_argument("--out", default=str(ROOT / "grace_ds" / "examples" / "default_model"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm
    from transformers import OlmoeForCausalLM

    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.examples.corpus import stdlib_bytes

    if "RANK" not in os.environ:  # plain `python`: one rank, no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29571"))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    torch.manual_seed(0)
    model = OlmoeForCausalLM(model_config())
    config = json.loads(Path(args.config).read_text())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    engine, *_ = grace_deepspeed.initialize(model, config, optimizer=optimizer)
    warmup = max(1, min(50, args.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to 10%
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    train, heldout = stdlib_bytes("train"), stdlib_bytes("heldout")
    generator = torch.Generator().manual_seed(0)
    stream = batches(train, config["train_micro_batch_size_per_gpu"], args.sequence_length, generator)
    curve = []
    start = time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc="training", unit="step"):
        batch = next(stream).to(engine.device)
        loss = engine(batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        scheduler.step()
        if step % 25 == 0 or step == 1:
            curve.append({"step": step, "loss": float(loss)})
    engine.eval()
    held = heldout_loss(engine.module, heldout, args.sequence_length, engine.device)
    grace_deepspeed.save_profile(engine)
    if torch.distributed.get_rank() == 0:
        out = Path(args.out)
        engine.module.config.output_router_logits = False
        engine.module.save_pretrained(out, safe_serialization=True)
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        summary = {"steps": args.steps, "train_seconds": round(time.perf_counter() - start, 1),
                   "heldout_loss_nats_per_byte": held, "heldout_perplexity": math.exp(held),
                   "parameters": sum(p.numel() for p in engine.module.parameters()), "curve": curve}
        (docs / "default-model-training.json").write_text(json.dumps(summary, indent=1) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve])
        ax.axhline(held, color="gray", linestyle="--", label=f"held-out {held:.3f} (ppl {math.exp(held):.2f})")
        ax.set(xlabel="step", ylabel="loss (nats / byte)", title="Embedded default model: training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / "default-model-loss.png", dpi=120)
        print(json.dumps({k: v for k, v in summary.items() if k != "curve"}))


if __name__ == "__main__":
    main()
