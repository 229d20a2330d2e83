"""Tiny random-init transformers MoE models of every supported family (offline, seconds)."""
import torch
import transformers

COMMON = dict(vocab_size=128, eos_token_id=1, bos_token_id=0, pad_token_id=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)

FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                       decoder_sparse_step=1, head_dim=8)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                    dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, first_k_dense_replace=0, n_group=1, topk_group=1,
                         kv_lora_rank=16, q_lora_rank=None, num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, first_k_dense_replace=0, n_group=1, topk_group=1,
                         kv_lora_rank=16, q_lora_rank=16, num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra})
    model = model_cls(config).eval()
    with torch.no_grad():  # random routers and experts with some spread, identical on every rank
        for name, param in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                param.normal_(0.0, 0.3)
    return model
