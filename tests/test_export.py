"""Back to a transformers checkpoint (grace_ds.deepspeed.save_pretrained), on 4 gloo ranks as 2 nodes x 2:
a checkpoint loaded with from_pretrained, converted by GRACE under a plan with replicas (serving, and
training under grace_ds.deepspeed.initialize), written back; plain AutoModelForCausalLM.from_pretrained
loads it as the unmodified model: before training the very checkpoint it came from, after training the
weights and logits of the unmodified model trained the same steps on one process."""
import pytest

from grace_ds.errors import GraceInputError
from tests import export_worker
from tests.export_worker import FAMILIES
from tests.test_megatron import spawn_two_nodes

FP32 = 1e-6  # largest absolute difference, fp32: only summation order differs


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return spawn_two_nodes(export_worker.main, tmp_path_factory.mktemp("export"))


def _loads_as_unmodified(entry: dict) -> None:
    assert entry["class"] and entry["same_keys"], entry
    assert entry["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}, entry["loading"]
    assert entry["grace_modules"] == 0


def test_export_before_training_is_the_original_checkpoint(reports):
    for family in FAMILIES:
        report = reports[0][family]
        assert report["replicated_experts"] > 0, f"{family}: the plan replicates no expert"
        for kind in ("converted_file", "served_file"):  # training's and serving's conversion
            assert report[kind] == {"same_names": True, "same_bits": True, "same_bytes": True}, (family, kind, report[kind])
        _loads_as_unmodified(report["converted"])
        assert max(report["converted"]["weights"].values()) == 0.0 and report["converted"]["logits"] == 0.0


def test_export_after_training_loads_as_the_model_trained_without_grace(reports):
    for family in FAMILIES:
        report = reports[0][family]
        trained = report["trained"]
        _loads_as_unmodified(trained)
        assert report["trained_file_names"], family
        assert set(trained["weights"]) >= {"embedding", "attention", "router", "experts"}, trained["weights"]
        # Training moved every kind of weight far beyond the tolerance, so equal weights say something.
        assert min(report["moved"].values()) > 1000 * FP32, report["moved"]
        for kind, value in trained["weights"].items():
            assert value <= FP32, f"{family}: {kind} weights differ by {value:.2e}"
        assert trained["logits"] <= FP32, f"{family}: logits differ by {trained['logits']:.2e}"
        assert report["replicas_apart"] == 0.0


def test_every_rank_gathers_every_expert(reports):
    for rank, report in enumerate(reports):
        for family in FAMILIES:
            entry = report[family]
            assert entry["gathered_names"] == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                               for p in ("down_proj", "gate_up_proj")], entry["gathered_names"]
            assert entry["gathered_experts"] <= FP32, f"rank {rank} {family}: {entry['gathered_experts']:.2e}"


def test_a_model_without_grace_blocks_is_refused(tmp_path):
    from grace_ds.deepspeed import save_pretrained
    from tests.tiny_models import tiny_model

    with pytest.raises(GraceInputError, match="no MoE block with GRACE experts"):
        save_pretrained(tiny_model("mixtral"), tmp_path)



def test_bf16_export_keeps_the_dtype_and_the_bits(reports):
    """bf16 Mixtral under a bf16 engine: exported as converted it is the original file byte for byte; after a
    step, from_pretrained in bf16 holds exactly the gathered experts and the engine's dense weights."""
    for report in reports:
        assert report["bf16"]["gathered_dtypes"] == ["torch.bfloat16"], report["bf16"]
    entry = reports[0]["bf16"]
    assert entry["converted_file"] == {"same_names": True, "same_bits": True, "same_bytes": True}, entry
    assert entry["loaded_dtypes"] == ["torch.bfloat16"], entry
    assert entry["experts_bit_equal"] and entry["dense_bit_equal"] and entry["dense_compared"] > 5, entry
    assert entry["experts_moved"] > 0, entry  # the step changed the experts: the check compares trained weights
