"""Is the embedded model's routing learned? Profiles it on held-out text and compares each layer with
a uniform-random top-k router on the same number of tokens: max/mean expert load, and the share of all
co-activation held by the 5% most frequent expert pairs. Writes docs/default-model-routing.md.
Usage: python scripts/default_model_report.py [--tokens 32768]
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def top_pair_share(coactivation: torch.Tensor, fraction: float = 0.05) -> float:
    pairs = coactivation[torch.triu_indices(*coactivation.shape, offset=1).unbind()]
    top = torch.topk(pairs, max(1, int(fraction * pairs.numel()))).values
    return float(top.sum() / pairs.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--model", default=str(ROOT / "grace_ds" / "examples" / "default_model"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from grace_ds.examples.corpus import stdlib_bytes
    from grace_ds.routing_profile import RoutingProfile
    from grace_ds.profiling import load_model, profile_model

    model, _ = load_model(args.model)
    trained = profile_model(model, stdlib_bytes("heldout"), sequence_length=128, max_tokens=args.tokens)
    tokens, experts, k = int(trained.num_tokens[0]), trained.num_experts, trained.top_k
    generator = torch.Generator().manual_seed(0)
    random_ids = torch.stack([torch.rand(tokens, experts, generator=generator).topk(k, dim=1).indices
                              for _ in range(trained.num_layers)], 1)
    uniform = RoutingProfile.from_topk_ids(random_ids, experts)
    lines = ["# Routing of the embedded default model\n",
             f"Measured by `python scripts/default_model_report.py --tokens {args.tokens}` on {datetime.date.today()}: "
             f"{tokens} held-out bytes (the standard library's held-out sources), {experts} experts, top-{k}. "
             "The uniform column is a uniform-random top-k router on as many tokens.\n",
             "| layer | max/mean expert load (trained) | (uniform) | top-5% pairs' share of co-activation (trained) | (uniform) |",
             "|---|---|---|---|---|"]
    for layer in range(trained.num_layers):
        load_t, load_u = trained.expert_load[layer], uniform.expert_load[layer]
        lines.append(f"| {trained.layer_names[layer]} | {float(load_t.max() / load_t.mean()):.2f} | "
                     f"{float(load_u.max() / load_u.mean()):.2f} | {top_pair_share(trained.coactivation[layer]):.3f} | "
                     f"{top_pair_share(uniform.coactivation[layer]):.3f} |")
    out = ROOT / "docs" / "default-model-routing.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
