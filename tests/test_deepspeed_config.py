import json
from pathlib import Path

import pytest

from grace_ds.deepspeed import split_config
from grace_ds.errors import GraceInputError

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
    ("yes", "must be an object"),
])
def test_bad_sections_give_one_clear_error(section, message):
    with pytest.raises(GraceInputError, match=message):
        split_config({"dtype": "fp32", "grace_moe": section})


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
