"""The README's snippets as a newcomer meets them: the DeepSpeed one runs as written from the repository
root after the main job (here against a small profile of the embedded model), the others compile and
import what they name, and the configs it names point at files the main job writes."""
import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
DEEPSPEED_SNIPPET = next(s for s in SNIPPETS if "init_inference" in s)
MODEL = Path("grace_ds/examples/default_model")   # the embedded model, as the snippet names it


def _clone_after_main_job(root: Path) -> Path:
    """A directory laid out as the repository is after `bash scripts/main.sh`, as far as the snippet looks:
    its configs, the embedded model, and a profile (the main job's, at a small size)."""
    shutil.copytree(ROOT / "configs", root / "configs")
    (root / "grace_ds" / "examples").mkdir(parents=True)
    (root / MODEL).symlink_to(ROOT / MODEL)
    (root / "outputs").mkdir()
    text = root / "heldout.txt"
    subprocess.run([sys.executable, "-c", f"from grace_ds.examples.corpus import write_heldout_text; write_heldout_text({str(text)!r})"],
                   check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    subprocess.run([sys.executable, "-m", "grace_ds.cli", "profile", "--model", str(ROOT / MODEL),
                    "--data", str(text), "--max-tokens", "1024", "--sequence-length", "128",
                    "--out", str(root / "outputs" / "profile.safetensors")], check=True, cwd=ROOT, timeout=HANG_GUARD_S,
                   capture_output=True)
    return root


def _run_snippet(root: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    script = root.parent / "snippet.py"  # outside the clone: the snippet's paths are the clone's, not its own
    script.write_text(DEEPSPEED_SNIPPET + "\nprint('LOGITS', tuple(logits.shape))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(env_extra)
    return subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_the_deepspeed_snippet_runs_as_written_in_plain_python_after_the_main_job(tmp_path):
    assert f'from_pretrained("{MODEL}")' in DEEPSPEED_SNIPPET   # the clone below lays out that model only
    root = _clone_after_main_job(tmp_path / "clone")
    done = _run_snippet(root, {})
    assert done.returncode == 0, done.stderr[-3000:]
    prompt = re.search(r'input_ids = torch\.tensor\(\[list\(b"(.*?)"\)\]\)', DEEPSPEED_SNIPPET).group(1)
    assert f"LOGITS (1, {len(prompt)}, 256)" in done.stdout
    # A process that says it was launched (WORLD_SIZE) but made no process group: one clear line, not torch's.
    done = _run_snippet(root, {"WORLD_SIZE": "1"})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("grace_ds.errors.GraceInputError: GRACE dispatch of layer 0 needs a torch.distributed "
                           "process group"), done.stderr[-3000:]
    assert "Default process group has not been initialized" not in done.stderr


def test_configs_the_readme_names_point_at_files_the_main_job_writes():
    main_job = (ROOT / "scripts" / "main.sh").read_text()
    named = sorted(set(re.findall(r"configs/[\w.-]+\.json", README)))
    assert "configs/ds_inference_cpu.json" in named
    for name in named:
        section = json.loads((ROOT / name).read_text()).get("grace_moe", {})
        for key in ("plan", "profile"):
            path = section.get(key)
            if path is None or not path.startswith("outputs/"):
                continue
            assert f'"$OUT/{path.removeprefix("outputs/")}"' in main_job, f"{name}: {key} {path} is not written by main.sh"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_every_readme_python_snippet_compiles_and_imports_what_exists(index):
    tree = ast.parse(SNIPPETS[index])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"snippet {index}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def test_the_readme_stays_a_front_door_whose_links_lead_somewhere():
    # Details belong in docs/; the README keeps what a newcomer needs first.
    assert len(README.splitlines()) < 250, f"README.md has {len(README.splitlines())} lines; move details to docs/"
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert relative, "the README links no docs page"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def _table_rows() -> dict[str, str]:
    """The README's `grace_moe` table: key -> its default column."""
    return dict(re.findall(r"^\| `([\w.]+)` \| ([^|]+?) \|", README, re.M))


def test_the_readme_json_snippet_is_a_valid_grace_moe_section_and_the_table_names_its_keys():
    from grace_ds.deepspeed import split_config

    snippet = json.loads(re.search(r"```json\n(.*?)```", README, re.S).group(1))
    _, section = split_config(snippet)   # refuses what the real config refuses
    rows = _table_rows()
    named = set()
    for key, value in snippet["grace_moe"].items():
        named |= {f"{key}.{sub}" for sub in value} if isinstance(value, dict) else {key}
    assert named <= set(rows), f"the snippet's keys missing from the table: {sorted(named - set(rows))}"
    assert section.communication.model_dump(mode="json") == snippet["grace_moe"]["communication"]


def test_the_readme_config_table_has_every_grace_moe_key_with_its_default():
    from pydantic import BaseModel

    from grace_ds.deepspeed import GraceMoEConfig
    from grace_ds.exchange import CommunicationConfig

    rows = _table_rows()
    fields = {**GraceMoEConfig.model_fields,
              **{f"communication.{name}": field for name, field in CommunicationConfig.model_fields.items()}}
    assert set(rows) == set(fields), f"table vs config: {sorted(set(rows) ^ set(fields))}"
    for key, cell in rows.items():
        default = fields[key].default
        if default is None or isinstance(default, BaseModel):
            continue   # no default ("-", "all ranks") or an object (its rows follow)
        try:
            shown = json.loads(cell)
        except ValueError:
            shown = cell   # a bare word: grace, tar, auto
        assert shown == getattr(default, "value", default), f"table: {key} defaults to {cell}, the config to {default}"


def test_the_module_pages_name_every_module_and_only_files_that_exist():
    """README's path of a token and docs/architecture.md's table follow the tree: every path they name
    exists, and every module of grace_ds/ (outside bench/ and examples/, named as folders) has a row."""
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    section = README[README.index("## Architecture"):]
    section = section[:section.index("\n## ", 1)]
    named = set(re.findall(r"grace_ds/[\w/]+(?:\.py|/)", section + architecture))
    assert named, "no grace_ds paths found"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"named but not in the tree: {missing}"
    rows = set(re.findall(r"^\| `(grace_ds/[\w/]+(?:\.py|/))`", architecture, re.M))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "grace_ds").rglob("*.py")
               if p.name != "__init__.py" and p.parts[len(ROOT.parts) + 1] not in ("bench", "examples", "planners")}
    unlisted = sorted(modules - rows)
    assert not unlisted, f"modules without a row in docs/architecture.md: {unlisted}"
