"""End-to-end number for the GPU benchmark: a whole transformers OLMoE model at the paper's shape (attention
+ MoE, `LAYERS` layers, random bf16 weights), converted to GRACE layers under each plan, with its routers'
top-k replayed from a trace (one trace layer per model layer). Prefill of 256 x 128 and 512 x 64 tokens
and one decode step of 256 and 512 sequences after a 128-token prompt, split over the ranks."""
from __future__ import annotations

import functools
import statistics

import torch
import torch.nn.functional as F

from grace_ds.bench.layers import keep, release, replay_bias, round_robin, slowest_rank, timed
from grace_ds.models import convert_model, find_moe_blocks
from grace_ds.plan import PlacementPlan
from grace_ds.runtime import GraceRuntime

LAYERS = 2
PREFILLS = {"prefill-256x128": (256, 128), "prefill-512x64": (512, 64)}
DECODES = {"decode-256": 256, "decode-512": 512}
PROMPT = 128


def olmoe_model(device: torch.device, dtype: torch.dtype, tiny: bool):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    size = dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4) if tiny else \
        dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16)
    config = OlmoeConfig(vocab_size=50304, num_hidden_layers=LAYERS, num_experts=64, num_experts_per_tok=8,
                         max_position_embeddings=4096, **size)
    torch.manual_seed(0)  # every rank builds the same model
    with torch.device(device):
        model = OlmoeForCausalLM(config)
    return model.to(dtype).eval()


def replay_routers(model, holder: dict) -> None:
    """Each router's logits get the replay bias on the recorded experts of holder['bias'][layer] [N, E]."""
    for layer, (_, block) in enumerate(find_moe_blocks(model)):
        router = block.gate

        def forward(hidden_states, router=router, layer=layer):
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(hidden_states, router.weight)
            probs = torch.softmax(logits.float() + holder["bias"][layer], dim=-1)
            top, index = torch.topk(probs, router.top_k, dim=-1)
            if router.norm_topk_prob:
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), index

        router.forward = forward


def bias_for(ids: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """ids [N, L, k] -> per layer [N, E] replay bias."""
    return [replay_bias(ids[:, layer], num_experts) for layer in range(ids.shape[1])]


def run_model(plans: dict[str, str], replay: torch.Tensor, args, rank: int, world: int, device: torch.device,
              dtype: torch.dtype) -> list[dict]:
    """replay [T, LAYERS, k]; one record per (plan, mode, batch) with the median forward time in ms. Every
    (plan, mode) model is built first and they all take turns in rounds (bench_layers.round_robin), as
    the single layers do, so that the link's drift falls on all of them alike."""
    from transformers import DynamicCache

    entries = []  # (record, step, input ids, (the model's replay holder, this batch's bias), back)
    for policy, path in plans.items():
        for mode in args.e2e_modes:
            model = olmoe_model(device, dtype, args.tiny)
            runtime = GraceRuntime(PlacementPlan.load(path), rank=rank, communication=mode, device=device)
            convert_model(model, runtime)
            holder: dict = {}
            replay_routers(model, holder)
            for name, input_ids, ids, prompt in model_batches(replay, args, rank, world, device):
                cache = None
                if prompt:  # build the prompt's cache once; every timed step starts from it
                    # (the replay taken round again when one GPU holds more prompt tokens than it has)
                    prompt_ids = replay[torch.arange(input_ids.shape[0] * prompt) % replay.shape[0]]
                    holder["bias"] = bias_for(prompt_ids.to(device), 64)
                    cache = DynamicCache(config=model.config)
                    with torch.no_grad():
                        model(torch.randint(0, 50304, (input_ids.shape[0], prompt), device=device),
                              cache=cache)
                # serving keeps the last position's logits; decode steps restart from the prompt's cache
                step = functools.partial(model, cache=cache, logits_to_keep=1)
                back = functools.partial(cache.crop, -input_ids.shape[1]) if cache is not None else None
                entries.append(({"policy": policy, "mode": mode, "batch": name, "layers": LAYERS},
                                step, input_ids, (holder, bias_for(ids, 64)), back))
    times: list[list[float]] = [[] for _ in entries]

    def run(i: int, iters: int, warmup: int) -> None:
        _, step, input_ids, (holder, bias), back = entries[i]
        holder["bias"] = bias
        times[i] += slowest_rank(timed(step, input_ids, iters, warmup, device, back), device)

    round_robin(len(entries), args.iters, args.warmup, run)
    results = []
    for (record, *_), timings in zip(entries, times):
        record["median_ms"] = statistics.median(timings)
        keep(results, record, rank, f"model/{record['policy']}/{record['mode']:<12} {record['batch']}")
    del entries  # the models go with their steps
    release(device)
    return results


def model_batches(replay: torch.Tensor, args, rank: int, world: int, device: torch.device) -> list[tuple]:
    """(name, input ids [sequences, length] of this rank, replayed top-k [tokens, LAYERS, k], prompt length
    or None) for each prefill and decode batch."""
    batches = []
    for name, (sequences, length) in PREFILLS.items():
        if args.tiny:
            sequences, length = max(sequences // 64, world), max(length // 8, 2)
        per_rank = sequences // world
        tokens = per_rank * length
        ids = replay[rank * tokens:(rank + 1) * tokens].to(device)
        batches.append((name, torch.randint(0, 50304, (per_rank, length), device=device), ids, None))
    for name, sequences in DECODES.items():
        if args.tiny:
            sequences = max(sequences // 64, world)
        per_rank = sequences // world
        ids = replay[rank * per_rank:(rank + 1) * per_rank].to(device)
        batches.append((name, torch.randint(0, 50304, (per_rank, 1), device=device), ids,
                        PROMPT if not args.tiny else 4))
    return batches
