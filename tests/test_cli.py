import argparse
import json
import re
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "grace_ds.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_profile_plan_simulate_end_to_end(shared_data, tmp_path):
    trace = shared_data / "routing" / "mixtral_arxiv.safetensors"
    profile, plan = tmp_path / "profile.safetensors", tmp_path / "plan.json"
    done = run_cli("profile-trace", trace, "--tokens", ":8192", "--out", profile)
    assert done.returncode == 0, done.stderr
    done = run_cli("plan", "--profile", profile, "--nodes", 2, "--gpus-per-node", 2, "--policy", "grace",
                   "--replica-slots", 1, "--out", plan)
    assert done.returncode == 0, done.stderr
    done = run_cli("simulate", "--plan", plan, "--trace", trace, "--tokens", "8192:16384", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("gpu_copies_per_token", "cross_node_copies_per_token", "cross_node_copies_per_token_flat",
                "max_over_mean_gpu_load", "modeled_layer_time_us"):
        assert result[key] >= 0
    assert result["tokens"] == 8192 and len(result["layers"]) == 3


def test_load_only_profile_and_balance_simulation(shared_data, tmp_path):
    loads = shared_data / "expert_load" / "deepseek_v3" / "decode_in1000out1000.json"
    profile, plan = tmp_path / "p.safetensors", tmp_path / "plan.json"
    assert run_cli("profile-load", loads, "--out", profile).returncode == 0
    assert run_cli("plan", "--profile", profile, "--nodes", 4, "--gpus-per-node", 8, "--policy", "eplb",
                   "--out", plan).returncode == 0
    done = run_cli("simulate", "--plan", plan, "--loads", loads, "--router", "modulo", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["max_over_mean_gpu_load"] < 1.05


def test_explain_prints_the_formula():
    done = run_cli("simulate", "--explain")
    assert done.returncode == 0 and "alpha" in done.stdout and "layer time" in done.stdout


@pytest.mark.parametrize("make_args", [
    lambda tmp: ["plan", "--profile", tmp / "missing.safetensors", "--out", tmp / "x.json"],
    lambda tmp: ["simulate", "--plan", (tmp / "junk.json"), "--loads", tmp / "junk.json"],
    lambda tmp: ["profile-trace", tmp / "junk.json", "--out", tmp / "p.safetensors"],
    lambda tmp: ["profile-load", tmp / "junk.json", "--out", tmp / "p.safetensors"],
])
def test_bad_input_is_one_line_exit_2_and_no_partial_output(tmp_path, make_args):
    (tmp_path / "junk.json").write_bytes(b"\x00\x01 not json")
    done = run_cli(*make_args(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("grace-ds: error: ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "p.safetensors").exists()


def test_profile_refuses_bytes_for_a_small_vocabulary_without_tokenizer(tmp_path):
    from tests.tiny_models import tiny_model

    model = tiny_model("olmoe")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("hello " * 200)
    done = run_cli("profile", "--model", model_dir, "--data", text, "--sequence-length", 64,
                   "--out", tmp_path / "p.safetensors")
    assert done.returncode == 2 and "128-token vocabulary" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "p.safetensors").exists()


def test_profile_counts_every_token(tmp_path):
    import json as jsonlib

    from grace_ds.routing_profile import RoutingProfile
    from tests.tiny_models import tiny_model

    model = tiny_model("mixtral")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    # A word-level tokenizer for the 128-token vocabulary, saved beside the model.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(128)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(jsonlib.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 128}" for i in range(700)))
    done = run_cli("profile", "--model", model_dir, "--data", text, "--sequence-length", 64, "--max-tokens", 650,
                   "--out", tmp_path / "p.safetensors")
    assert done.returncode == 0, done.stderr
    profile = RoutingProfile.load(tmp_path / "p.safetensors")
    assert profile.num_tokens.tolist() == [640, 640]  # 10 whole sequences of 64
    assert profile.expert_load.sum(1).tolist() == [640 * 2, 640 * 2]
    assert profile.coactivation is not None and profile.sample_topk_ids.shape == (640, 2, 2)


@pytest.mark.parametrize("flags", [["--paper"], ["--no-tune"], ["--r", "0.3"]])
def test_grace_plan_modes(shared_data, tmp_path, flags):
    trace = shared_data / "routing" / "olmoe_arxiv.safetensors"
    assert run_cli("profile-trace", trace, "--tokens", ":4096", "--out", tmp_path / "p.safetensors").returncode == 0
    done = run_cli("plan", "--profile", tmp_path / "p.safetensors", "--policy", "grace", *flags, "--out", tmp_path / "plan.json")
    assert done.returncode == 0, done.stderr
    options = json.loads((tmp_path / "plan.json").read_text())["options"]
    settings = options["layer_settings"]
    assert {"flat", "hierarchical"} == set(options["modeled_layer_time_us"])
    if flags == ["--paper"]:
        assert all(s["replication"] == "paper" and s["gpu_grouping"] == "spectral" for s in settings)
        assert all(0.0 <= s["r"] <= 0.5 for s in settings)  # the knee of S(r) vs U(r) on the grid
    if flags == ["--r", "0.3"]:
        assert all(s["r"] == 0.3 for s in settings)
    assert options["tuned"] is False


SUBCOMMANDS = ("profile-trace", "profile", "profile-load", "plan", "simulate", "evaluate", "checkpoint-to-deepspeed",
               "checkpoint-info")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_has_help_and_every_subcommand_an_example(command):
    from grace_ds.cli import EXAMPLES, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest}: no help text"
        if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
            assert "(default: " in sub.formatter_class(command)._get_help_string(action), action.dest
    text = sub.format_help()
    assert f"example:\n  {EXAMPLES[command]}" in text and EXAMPLES[command].startswith(f"grace-ds {command} ")
    # The example parses: its options are this subcommand's.
    args = parser.parse_args(EXAMPLES[command].split()[1:])
    assert args.command == command


def test_simulate_prints_whole_bytes_with_units_and_refuses_another_topology(shared_data, tmp_path):
    trace = shared_data / "routing" / "mixtral_arxiv.safetensors"
    profile, plan = tmp_path / "profile.safetensors", tmp_path / "plan.json"
    assert run_cli("profile-trace", trace, "--tokens", ":2048", "--out", profile).returncode == 0
    assert run_cli("plan", "--profile", profile, "--nodes", 2, "--gpus-per-node", 2, "--out", plan).returncode == 0
    done = run_cli("simulate", "--plan", plan, "--trace", trace, "--tokens", "2048:4096", "--nodes", 2,
                   "--gpus-per-node", 2)
    assert done.returncode == 0, done.stderr
    assert "(grace, 2 nodes x 2 GPUs)" in done.stdout
    byte_lines = [line for line in done.stdout.splitlines() if line.split()[0].endswith("_bytes")]
    assert byte_lines and all(re.fullmatch(r"\s*\w+\s+[\d,]+ B \([\d,.]+ MiB\)", line) for line in byte_lines), byte_lines
    assert re.search(r"modeled_layer_time_us\s+[\d,]+\.\d us", done.stdout)
    done = run_cli("simulate", "--plan", plan, "--trace", trace, "--nodes", 1, "--gpus-per-node", 4)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "plan is for 2 nodes x 2 GPUs, asked for 1 node x 4 GPUs" in done.stderr


@pytest.mark.parametrize("command, option", [("plan", "--out"), ("profile", "--out"), ("profile", "--trace-out"),
                                             ("evaluate", "--json-out")])
def test_output_into_a_missing_folder_is_refused_before_any_work(tmp_path, command, option):
    missing = tmp_path / "missing" / "dir"
    inputs = {"plan": ["--profile", tmp_path / "p.safetensors"], "evaluate": ["--trace", tmp_path / "t.safetensors"],
              "profile": ["--model", tmp_path, "--data", tmp_path / "t.txt"]}[command]
    outputs = {"plan": {"--out": tmp_path / "plan.json"}, "evaluate": {},
               "profile": {"--out": tmp_path / "p.safetensors", "--trace-out": tmp_path / "t.safetensors"}}[command]
    outputs[option] = missing / "x.out"
    done = run_cli(command, *inputs, *[item for pair in outputs.items() for item in pair])
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr == f"grace-ds: error: {option} {missing / 'x.out'}: no folder {missing} (create it first)\n"
    assert not (tmp_path / "missing").exists()


def test_topology_names_count_singular_and_plural():
    from grace_ds.topology import Topology

    assert Topology.uniform(1, 4).describe() == "1 node x 4 GPUs"
    assert Topology.uniform(2, 1).describe() == "2 nodes x 1 GPU"
    assert Topology((4, 2)).describe() == "2 nodes with [4, 2] GPUs"


def test_checkpoint_info_describes_the_record_and_what_a_plan_remaps(shared_data, tmp_path):
    """A tag folder with the layout record of a GRACE plan (and ZeRO files): its layers, the saver's size,
    the optimizer files; under the same plan nothing moves, under another the remap is named; a folder
    without a record is refused in one line."""
    from grace_ds.checkpoint_layout import plan_layer_layout, write_layout
    from grace_ds.plan import PlacementPlan

    trace = shared_data / "routing" / "mixtral_arxiv.safetensors"
    profile = tmp_path / "profile.safetensors"
    assert run_cli("profile-trace", trace, "--tokens", ":4096", "--out", profile).returncode == 0
    plans = {}
    for policy in ("grace", "contiguous"):
        plans[policy] = tmp_path / f"plan_{policy}.json"
        assert run_cli("plan", "--profile", profile, "--nodes", 2, "--gpus-per-node", 2, "--policy", policy,
                       "--out", plans[policy]).returncode == 0
    grace = PlacementPlan.load(plans["grace"])
    tag = tmp_path / "ckpt" / "global_step3"
    tag.mkdir(parents=True)
    write_layout(tag / "grace_layout.json", [plan_layer_layout(grace, layer) for layer in range(grace.num_layers)],
                 world_size=4)
    for rank in range(4):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    done = run_cli("checkpoint-info", tag)
    assert done.returncode == 0, done.stderr
    assert "saved by 4 ranks, 3 MoE layers" in done.stdout and "ZeRO partitions, 4 files" in done.stdout
    assert done.stdout.count("a GRACE plan (4 GPUs x") == 3, done.stdout
    same = run_cli("checkpoint-info", tag, "--plan", plans["grace"])
    assert "the same layout, loaded as saved" in same.stdout, same.stdout
    other = run_cli("checkpoint-info", tag, "--plan", plans["contiguous"])
    assert "MoE layer 0 was saved under a GRACE plan" in other.stdout, other.stdout
    assert "optimizer states (ZeRO partitions: in a job of any size)" in other.stdout, other.stdout
    missing = run_cli("checkpoint-info", tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "grace_layout.json" in missing.stderr
