import json
from pathlib import Path

import pytest

from grace_ds.deepspeed_config import split_config
from grace_ds.errors import GraceInputError
from grace_ds.exchange import CommunicationConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_lose_the_section(path):
    rest, section = split_config(path)
    assert "grace_moe" not in rest and section is not None


def test_no_section_is_plain_deepspeed():
    assert split_config({"dtype": "fp32"}) == ({"dtype": "fp32"}, None)


@pytest.mark.parametrize("section, message", [
    ({"plan": "a.json", "profile": "b.safetensors"}, "either 'plan' or 'profile'"),
    ({"router": "nearest"}, "router"),
    ({"replica_slots": -1}, "replica_slots"),
    ({"unknown_key": 1}, "unknown_key"),
    ({"communication": "ring"}, "communication"),
    ({"communication": {"mode": "gather", "gather_max_tokens": -1}}, "gather_max_tokens"),
    ({"communication": {"mode": "flat", "gather": 1}}, "gather"),
    ({"gather_max_tokens": 64}, "gather_max_tokens moved under 'communication'"),
    ("yes", "must be an object"),
])
def test_bad_sections_give_one_clear_error(section, message):
    with pytest.raises(GraceInputError, match=message):
        split_config({"dtype": "fp32", "grace_moe": section})


def test_exchange_settings_reach_the_section():
    _, section = split_config({"grace_moe": {"communication": {"mode": "gather", "gather_max_tokens": 64,
                                                               "cuda_graphs": False, "hierarchical_gather": False}}})
    comm = section.communication
    assert (comm.mode.value, comm.gather_max_tokens, comm.cuda_graphs, comm.hierarchical_gather) == ("gather", 64, False, False)
    assert comm.hierarchical_min_tokens == 512 and comm.node_groups is False
    _, shorthand = split_config({"grace_moe": {"communication": "hierarchical"}})
    assert shorthand.communication == CommunicationConfig(mode="hierarchical")


@pytest.mark.parametrize("label", ["flat", "hierarchical", "gather", "auto", "gather-ring", "hierarchical-node-groups",
                                   "gather-ring-node-groups"])
def test_variant_labels_round_trip(label):
    assert CommunicationConfig.from_label(label).label == label


def test_variant_label_errors_name_the_label():
    with pytest.raises(ValueError, match="flat-ring"):
        CommunicationConfig.from_label("flat-ring")
    with pytest.raises(ValueError):
        CommunicationConfig.from_label("ring")


def test_unreadable_json_names_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{not json")
    with pytest.raises(GraceInputError, match="ds.json"):
        split_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(GraceInputError, match="JSON object"):
        split_config(path)
    path.write_text(json.dumps({"grace_moe": {"policy": "magic"}}))
    with pytest.raises(GraceInputError, match="policy"):
        split_config(path)


def test_online_section_is_validated_and_replans_are_logged_to_wandb(tmp_path, monkeypatch, capsys):
    import wandb

    from grace_ds.deepspeed_monitoring import log_replan

    _, section = split_config({"grace_moe": {"plan": "p.json", "online": {"window_steps": 8, "max_moves_per_step": 3,
                                                                          "policy": "eplb-periodic"}}})
    settings = section.online.settings()
    assert (settings.window_steps, settings.window_buckets, settings.max_moves_per_step, settings.policy) == \
        (8, 4, 3, "eplb-periodic")
    for bad in ({"window_steps": 6}, {"max_moves_per_step": -1}, {"policy": "sometimes"}, {"every": 3}):
        with pytest.raises(GraceInputError, match="online"):
            split_config({"grace_moe": {"plan": "p.json", "online": bad}})
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = wandb.init(project="t", dir=str(tmp_path))
    try:
        log_replan({"step": 16, "drift": 0.2, "moves": 3, "bytes_moved": 3 << 20, "transfer_s": 0.5,
                     "modeled_time_before_us": 100.0, "modeled_time_after_us": 90.0, "replanned": True})
        assert run.summary["grace_moe/online/moves"] == 3 and run.summary["grace_moe/online/drift"] == 0.2
    finally:
        run.finish()
    assert "moved 3 expert copies (3.0 MiB) in 0.50 s, modeled layer time 100 -> 90 us" in capsys.readouterr().out
