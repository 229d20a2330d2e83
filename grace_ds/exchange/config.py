"""The `communication` sub-config: which exchange carries tokens to their experts, and its knobs.

One declaration of the mode names (CommMode) and of every exchange setting; the DeepSpeed section,
the megatron layer, the CLI and the benchmarks all build their exchange from this model.
"""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Under `auto`, calls whose largest rank holds fewer tokens go flat: near the flat/hierarchical crossover
# measured on 4x H200 as 2 logical nodes x 2 (356-1218 tokens per GPU, docs/benchmarks.md).
DEFAULT_HIERARCHICAL_MIN_TOKENS = 512
# Under `auto`, calls whose largest rank holds at most this many tokens take the gather exchange (decode).
DEFAULT_GATHER_MAX_TOKENS = 128
# Suffixes of a benchmark variant's label (CommunicationConfig.from_label).
RING_SUFFIX = "-ring"
NODE_GROUPS_SUFFIX = "-node-groups"


class CommMode(str, Enum):
    """flat: one all-to-all hop. hierarchical: across nodes once per token and node, then inside the node.
    gather: all-gather tokens, reduce-scatter outputs (inference, small batches). auto: chosen per plan
    and per call (grace_ds.exchange.choice)."""

    FLAT = "flat"
    HIERARCHICAL = "hierarchical"
    GATHER = "gather"
    AUTO = "auto"


class CommunicationConfig(BaseModel):
    """`grace_moe.communication`: a mode name, or an object of these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    mode: CommMode = CommMode.AUTO
    hierarchical_min_tokens: int = Field(DEFAULT_HIERARCHICAL_MIN_TOKENS, ge=0)
    """With `auto` resolved to hierarchical: MoE calls whose largest rank holds fewer tokens go flat (one
    tiny all-gather of token counts per forward decides; 0: never). 512 is near the crossover measured on
    4x H200 as 2 x 2."""
    gather_max_tokens: int = Field(DEFAULT_GATHER_MAX_TOKENS, ge=0)
    """With `auto`: MoE calls whose largest rank holds at most this many tokens (decode) take the gather
    exchange (every token to every GPU, summed outputs back; no host synchronisation; 0: never)."""
    cuda_graphs: bool = True
    """On GPUs, gather calls replay CUDA graphs (one per layer and token bucket, captured on first use)."""
    hierarchical_gather: bool = True
    """Across nodes the gather exchange sends a token over the node link once per remote node, then fans it
    out over NVLink (false: NCCL's ring all-gather and reduce-scatter over all ranks)."""
    node_groups: bool = False
    """Exchanges inside a node (hierarchical hop 2, the gather's in-node stages) over a process group of the
    node's ranks instead of the job's (created at start-up; see grace_ds.exchange.node_groups)."""

    @model_validator(mode="before")
    @classmethod
    def _mode_shorthand(cls, value):
        return {"mode": value} if isinstance(value, (str, CommMode)) else value

    @classmethod
    def of(cls, value: "CommunicationConfig | CommMode | str | dict | None") -> "CommunicationConfig":
        """A config from a config, a mode name, a dict of fields, or None (the defaults)."""
        if isinstance(value, cls):
            return value
        return cls.model_validate({} if value is None else value)

    @classmethod
    def from_label(cls, label: str, **fields) -> "CommunicationConfig":
        """A benchmark or test variant's label: <mode>[-ring][-node-groups]. `-ring`: the gather exchange
        over NCCL's ring collectives; `-node-groups`: in-node stages over each node's own group."""
        node_groups = label.endswith(NODE_GROUPS_SUFFIX)
        base = label.removesuffix(NODE_GROUPS_SUFFIX)
        ring = base.endswith(RING_SUFFIX)
        mode = base.removesuffix(RING_SUFFIX)
        if ring and mode != CommMode.GATHER.value:
            raise ValueError(f"{label!r}: only the gather exchange has a ring variant")
        return cls(mode=mode, hierarchical_gather=not ring, node_groups=node_groups, **fields)

    @property
    def label(self) -> str:
        """The inverse of from_label (for the fields it covers)."""
        ring = RING_SUFFIX if self.mode == CommMode.GATHER and not self.hierarchical_gather else ""
        return self.mode.value + ring + (NODE_GROUPS_SUFFIX if self.node_groups else "")


COMM_MODES = tuple(m.value for m in CommMode)
