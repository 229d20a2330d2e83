"""A checkpoint read rank by rank (grace_ds.models.rank_load) gives each rank of a plan exactly the model that
from_pretrained + convert_model gives it, while reading only the dense weights and that rank's experts.
One process plays each rank of a 2 x 2 GRACE plan with replicas in turn (no exchange is run here; serving
from a directory on 4 gloo ranks is in tests/test_runtime_exactness.py)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from grace_ds.errors import GraceInputError
from grace_ds.models import convert_model
from grace_ds.models.rank_load import load_for_rank, weights_per_gpu
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.runtime import GraceRuntime
from grace_ds.topology import Topology
from tests.tiny_models import FAMILIES, tiny_model

NUM_EXPERTS, GPUS = 8, 4


def skewed_plan(num_layers: int):
    """A GRACE plan for 2 x 2 with one replica slot a GPU: experts 0 and 1 are hot, so they get copies."""
    generator = torch.Generator().manual_seed(7)
    first = torch.where(torch.rand(4096, num_layers, generator=generator) < 0.6,
                        torch.randint(0, 2, (4096, num_layers), generator=generator),
                        torch.randint(0, NUM_EXPERTS, (4096, num_layers), generator=generator))
    second = (first + 1 + torch.randint(0, NUM_EXPERTS - 1, first.shape, generator=generator)) % NUM_EXPERTS
    profile = RoutingProfile.from_topk_ids(torch.stack([first, second], dim=-1), NUM_EXPERTS)
    plan = make_plan("grace", profile, Topology.uniform(2, 2), replica_slots=1)
    assert (plan.copies_per_expert() > 1).any()
    return plan


def converted(directory, plan, rank: int, dtype=torch.float32):
    """What each rank served before: the whole model from from_pretrained, then converted."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return convert_model(model, GraceRuntime(plan, rank=rank))


def assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Every parameter and buffer (non-persistent ones too: rotary frequencies) equal, name, dtype and bits."""
    for kind in ("named_parameters", "named_buffers"):
        got_tensors, want_tensors = dict(getattr(got, kind)()), dict(getattr(want, kind)())
        assert sorted(got_tensors) == sorted(want_tensors), kind
        for name, tensor in want_tensors.items():
            assert got_tensors[name].dtype == tensor.dtype, name
            assert torch.equal(got_tensors[name], tensor), f"{name} differs"
    assert not got.training


def expert_bytes_in(directory) -> tuple[int, int]:
    """(bytes of routed-expert tensors, bytes of the rest) in a Hub-format checkpoint file."""
    experts = rest = 0
    with safe_open(directory / "model.safetensors", "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            size = tensor.numel() * tensor.element_size()
            if ".experts." in key:
                experts += size
            else:
                rest += size
    return experts, rest


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_rank_gets_the_converted_model_reading_only_its_experts(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path)
    plan = skewed_plan(2)
    all_experts, dense = expert_bytes_in(tmp_path)
    shares = weights_per_gpu(tmp_path, plan)  # what `grace-ds weights` tells before any weight is read
    for rank in range(GPUS):
        runtime = GraceRuntime(plan, rank=rank)
        model, stats = load_for_rank(tmp_path, runtime, progress=False)
        assert_same_model(model, converted(tmp_path, plan, rank))
        held = sum(len(set(e for e in runtime.local_slots(layer).tolist() if e >= 0)) for layer in range(2))
        assert stats.dense_bytes == dense
        assert stats.expert_bytes == all_experts * held // (2 * NUM_EXPERTS)  # every held expert once
        assert stats.expert_bytes + stats.skipped_expert_bytes == all_experts
        assert stats.unexpected_keys == []
        told = shares[rank]
        assert (told.dense_bytes, told.expert_bytes, told.skipped_expert_bytes) == \
            (stats.dense_bytes, stats.expert_bytes, stats.skipped_expert_bytes)


def test_bf16_fused_sharded_tied_and_dense_layers(tmp_path):
    """DeepSeek-V3 with a dense first layer (plan layer 0 is model layer 1) and tied embeddings, saved in
    transformers' fused layout (experts as [E, ...] tensors, read row by row) over several shard files,
    loaded in bf16."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from tests.tiny_models import COMMON

    extra = dict(FAMILIES["deepseek_v3"][2], num_hidden_layers=3, first_k_dense_replace=1)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, **extra}, tie_word_embeddings=True))
    model.save_pretrained(tmp_path, save_original_format=False, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.1.mlp.experts.gate_up_proj" in index["weight_map"]  # fused on disk
    plan = skewed_plan(2)
    for rank in range(GPUS):
        loaded, stats = load_for_rank(tmp_path, GraceRuntime(plan, rank=rank), dtype=torch.bfloat16, progress=False)
        assert_same_model(loaded, converted(tmp_path, plan, rank, torch.bfloat16))
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert stats.skipped_expert_bytes > 0 and stats.files == len(set(index["weight_map"].values()))


def test_a_plan_of_another_model_or_a_broken_checkpoint_is_refused_by_name(tmp_path):
    model = tiny_model("mixtral")
    good = tmp_path / "good"
    model.save_pretrained(good)
    plan = skewed_plan(2)

    def refused(directory, match, plan=plan, rank=1):
        with pytest.raises(GraceInputError, match=match):
            load_for_rank(directory, GraceRuntime(plan, rank=rank), progress=False)

    refused(good, "plan", plan=skewed_plan(3))  # 3 layers planned, 2 in the model
    weights = load_file(good / "model.safetensors")
    runtime = GraceRuntime(plan, rank=1)
    held = int(next(e for e in runtime.local_slots(0).tolist() if e >= 0))

    def variant(name, change):
        directory = tmp_path / name
        directory.mkdir()
        for extra in ("config.json", "generation_config.json"):
            (directory / extra).write_bytes((good / extra).read_bytes())
        save_file(change(dict(weights)), directory / "model.safetensors")
        return directory

    lacking_expert = variant("expert", lambda w: {k: v for k, v in w.items()
                                                  if k != f"model.layers.0.block_sparse_moe.experts.{held}.w3.weight"})
    refused(lacking_expert, f"lacks 1 expert tensor.*plan layer 0, expert {held}, gate_up_proj")
    refused(variant("dense", lambda w: {k: v for k, v in w.items() if "q_proj" not in k}), "lacks 2 weight")
    refused(variant("shape", lambda w: {**w, "model.norm.weight": torch.ones(7)}), r"model.norm.weight: shape \(7,\)")
    # A rank that does not hold the missing expert never reads it, and loads.
    other = next(r for r in range(GPUS) if held not in GraceRuntime(plan, rank=r).local_slots(0).tolist())
    load_for_rank(lacking_expert, GraceRuntime(plan, rank=other), progress=False)

    bins = tmp_path / "bins"  # a pre-safetensors checkpoint
    bins.mkdir()
    (bins / "config.json").write_bytes((good / "config.json").read_bytes())
    torch.save(model.state_dict(), bins / "pytorch_model.bin")
    refused(bins, "only safetensors")
    quantized = variant("quantized", lambda w: w)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    refused(quantized, "quantized checkpoints")
    sharded = variant("index", lambda w: w)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in weights},
                        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    refused(sharded, "missing")
    (sharded / "model.safetensors.index.json").write_text("{not json")
    refused(sharded, "not a safetensors index")
    refused(tmp_path / "nowhere", "no config.json")


def test_unused_checkpoint_keys_are_left_unread_as_transformers_does(tmp_path):
    """A checkpoint with tensors the model class has no place for (DeepSeek-V3's multi-token-prediction
    layer, say) loads; the keys are reported, not read."""
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "model.layers.9.mtp.weight": torch.ones(3)}, tmp_path / "model.safetensors")
    loaded, stats = load_for_rank(tmp_path, GraceRuntime(skewed_plan(2), rank=0), progress=False)
    assert stats.unexpected_keys == ["model.layers.9.mtp.weight"]
    assert_same_model(loaded, converted(tmp_path, skewed_plan(2), 0))


def test_grace_ds_weights_tells_each_gpus_share_or_refuses_by_name(tmp_path):
    import subprocess
    import sys

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    skewed_plan(2).save(tmp_path / "plan.json")
    shares = weights_per_gpu(tmp_path / "model", skewed_plan(2))
    done = subprocess.run([sys.executable, "-m", "grace_ds.cli", "weights", "--model", str(tmp_path / "model"),
                           "--plan", str(tmp_path / "plan.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "2 nodes x 2 GPUs" in lines[0] and len(lines) == 2 + GPUS
    for gpu, share in enumerate(shares):
        assert lines[1 + gpu].startswith(f"  GPU {gpu} (node {gpu // 2}): {share.read_bytes / 2**20:,.1f} MiB")
    skewed_plan(3).save(tmp_path / "other.json")
    done = subprocess.run([sys.executable, "-m", "grace_ds.cli", "weights", "--model", str(tmp_path / "model"),
                           "--plan", str(tmp_path / "other.json")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("grace-ds: error:") and "plan" in done.stderr
