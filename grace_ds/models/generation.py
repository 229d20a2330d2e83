"""transformers' generate on expert-parallel ranks that finish at different steps.

Every MoE layer is a collective over the serving ranks, so a rank that stops calling the model (its
sequences reached EOS or max_new_tokens first, or it had no prompt) would leave the others waiting in their
next exchange until the fault timeout stops the job. transformers' generate has the remedy ZeRO-3 uses,
synced_gpus: a finished rank keeps running forwards, their outputs unused, until every rank is done (one tiny
all-reduce per step). A served GRACE model defaults to it whenever more than one rank serves, and a rank
with an empty batch joins with a one-token placeholder and returns its empty batch.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

# Arguments shaped like the batch, or asking for more than the placeholder's one step.
_PLACEHOLDER_DROPS = ("attention_mask", "min_new_tokens", "min_length", "max_length", "inputs_embeds")


def keep_ranks_in_step(model: nn.Module, serving_ranks: int) -> None:
    """Make `model.generate` default to synced_gpus=True and accept an empty batch when more than one
    rank serves (an explicit synced_gpus is honoured)."""
    if serving_ranks <= 1 or not hasattr(model, "generate"):
        return
    plain = model.generate

    @functools.wraps(plain)
    def generate(inputs: torch.Tensor | None = None, *args, **kwargs):
        kwargs.setdefault("synced_gpus", True)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if not kwargs["synced_gpus"] or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0]:
            return plain(inputs, *args, **kwargs)
        # Nothing to generate here, but the others' steps need this rank: a one-token placeholder keeps
        # stepping (synced) until every rank is done.
        token = kwargs.get("pad_token_id", model.generation_config.pad_token_id)
        placeholder = torch.full((1, 1), 0 if token is None else int(token), dtype=ids.dtype, device=ids.device)
        rest = {k: v for k, v in kwargs.items() if k not in _PLACEHOLDER_DROPS and k != "input_ids"}
        result = plain(placeholder, *args, **{**rest, "max_new_tokens": 1})
        return ids if isinstance(result, torch.Tensor) else type(result)(sequences=ids)

    model.generate = generate
