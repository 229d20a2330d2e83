"""Adapters for transformers 5.x sparse-MoE model families."""
from grace_ds.models.convert import SUPPORTED_BLOCKS, convert_model, find_moe_blocks

__all__ = ["SUPPORTED_BLOCKS", "convert_model", "find_moe_blocks"]
