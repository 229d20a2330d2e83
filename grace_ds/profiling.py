"""Profile a transformers MoE model on a text: run it over the text in fixed-length sequences with the
profiling hooks on, and return the RoutingProfile."""
from __future__ import annotations

from pathlib import Path

import torch

from grace_ds.errors import GraceInputError
from grace_ds.routing_profile import RoutingProfile


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from a transformers checkpoint directory, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise GraceInputError(f"{path}: not a transformers checkpoint directory (no config.json)")
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        # Corrupt or truncated weights, a broken config, shapes that do not fit the config.
        raise GraceInputError(f"{path}: cannot load the model ({str(error).splitlines()[0][:300]})") from None
    tokenizer = None
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def encode_text(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """[N] token ids: the model's tokenizer, else UTF-8 bytes (byte-level models)."""
    if tokenizer is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    if vocab_size < 256:
        raise GraceInputError(f"the model has no tokenizer and a {vocab_size}-token vocabulary: cannot feed bytes")
    return ids


def profile_model(model: torch.nn.Module, token_ids: torch.Tensor, sequence_length: int = 256, batch_size: int = 4,
                  max_tokens: int | None = None, show_progress: bool = True,
                  sample_tokens: int | None = None) -> RoutingProfile:
    """`sample_tokens`: how many tokens' top-k sets the profile keeps (every token's: a routing trace)."""
    from tqdm import tqdm

    from grace_ds.deepspeed_monitoring import attach_recorder

    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    usable = (token_ids.numel() // sequence_length) * sequence_length
    if usable == 0:
        raise GraceInputError(f"the text has {token_ids.numel()} tokens, fewer than one sequence of {sequence_length}")
    sequences = token_ids[:usable].view(-1, sequence_length)
    recorder = attach_recorder(model)
    if sample_tokens is not None:
        recorder.sample_tokens = sample_tokens
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), tqdm(total=usable, unit="tok", desc="profiling", disable=not show_progress) as bar:
            for start in range(0, sequences.shape[0], batch_size):
                batch = sequences[start:start + batch_size].to(device)
                model(batch)
                bar.update(batch.numel())
    finally:
        recorder.detach()
    return recorder.to_profile()
