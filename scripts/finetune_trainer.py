"""Fine-tune a transformers MoE checkpoint with transformers' Trainer through GRACE (grace_ds.GraceTrainer):
the DeepSpeed JSON's `grace_moe` section places the experts, Trainer does the rest (its AdamW and scheduler,
logging to --report-to, checkpoints every --save-steps that resume under any plan, the final model saved
as the unmodified checkpoint). Launched like any Trainer script, e.g. as 2 emulated nodes x 2 on one machine:

  bash scripts/launch.sh --emulate-nodes 2 --num-gpus 2 -- scripts/finetune_trainer.py \
      --model grace_ds/examples/default_model --deepspeed configs/ds_train_trainer.json --output-dir outputs/finetune

configs/ds_train_trainer.json plans at start-up from the main job's profile (outputs/profile.safetensors;
`grace-ds profile` makes one for any model). --data: a UTF-8 text file (default: the standard library's
training part, the text the embedded model was trained on); set "enabled": false in the section to train
the same run without GRACE.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("grace_ds/examples/default_model"))
    parser.add_argument("--data", type=Path, help="UTF-8 text to train on (default: the standard library's training part)")
    parser.add_argument("--deepspeed", type=Path, default=Path("configs/ds_train_trainer.json"), help="DeepSpeed JSON with grace_moe")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/finetune"))
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank and micro step")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--save-steps", type=int, default=25)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--resume", help="a checkpoint-N directory of an earlier run (any plan)")
    parser.add_argument("--report-to", default="none", help="Trainer's report_to: none, wandb, tensorboard, ...")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args()

    import torch
    import transformers

    from grace_ds.errors import GraceInputError
    from grace_ds.profiling import encode_text, load_model
    from grace_ds.transformers_trainer import GraceTrainer, cpu_process_state

    try:
        model, tokenizer = load_model(args.model)
        if args.data is not None:
            ids = encode_text(args.data.read_text(encoding="utf-8", errors="replace"), tokenizer, model.config.vocab_size)
        else:
            from grace_ds.examples.corpus import stdlib_bytes

            ids = stdlib_bytes("train")
        usable = ids.numel() // args.sequence_length * args.sequence_length
        if usable == 0:
            raise GraceInputError(f"{args.data}: fewer than --sequence-length {args.sequence_length} tokens")
        samples = [{"input_ids": row, "labels": row} for row in ids[:usable].view(-1, args.sequence_length)]
        training = transformers.TrainingArguments(
            output_dir=str(args.output_dir), deepspeed=str(args.deepspeed), max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, logging_steps=args.logging_steps,
            save_steps=args.save_steps, report_to=args.report_to, seed=0, warmup_steps=min(10, args.max_steps // 10),
            **({} if torch.cuda.is_available() else cpu_process_state()))  # CPU: accelerate's state over gloo
        model.train()
        trainer = GraceTrainer(model=model, args=training, train_dataset=samples, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=args.resume)
        trainer.save_model()
    except GraceInputError as error:
        print(f"finetune_trainer: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if trainer.is_world_process_zero():
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        losses = f": loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f}" if logs else ""
        print(f"trained {trainer.state.global_step} steps{losses}")
        figures = {k: v for k, v in logs[-1].items() if k.startswith("grace_moe/")} if logs else {}
        if figures:
            print("last interval: " + ", ".join(f"{k.removeprefix('grace_moe/')} {v:.4g}" for k, v in figures.items()))
        print(f"unmodified transformers checkpoint in {args.output_dir} (AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    main()
