"""The launcher scripts and DeepSpeed configs in scripts/."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("launch_*.sh"))
CONFIGS = sorted((ROOT / "scripts" / "ds").glob("*.json"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)
    assert 'source "$here/entry.sh"' in script.read_text() and '"${entry[@]}"' in script.read_text()


@pytest.mark.parametrize("args, entry, rest", [
    ([], "--module ppo_fast.cli train", ""),
    (["train", "--steps", "3"], "--module ppo_fast.cli train", "--steps 3"),
    (["backends"], "--module ppo_fast.cli backends", ""),
    (["benches/rollout.py", "--compare"], "benches/rollout.py", "--compare"),
])
def test_entry_runs_a_subcommand_or_a_script(args, entry, rest):
    shown = subprocess.run(
        ["bash", "-c", 'source "$0"; echo "${entry[*]}"; echo "$*"', str(ROOT / "scripts" / "entry.sh"),
         *args], capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown == [entry, rest]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_ds_configs(config):
    data = json.loads(config.read_text())
    stage = data["zero_optimization"]["stage"]
    assert f"zero{stage}" in config.name
    assert data["bf16"]["enabled"] == ("gpu" in config.name)
    if "offload" in config.name:
        assert data["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.slow
def test_cpu_launcher_runs_the_rollout_benchmark():
    pytest.importorskip("deepspeed")
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("deepspeed", path=env["PATH"]), "the deepspeed launcher is not on the PATH"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "launch_cpu.sh"), "benches/rollout.py", "--preset", "tiny", "--batch-size", "2",
         "--max-new-tokens", "6", "--compare", "--repeats", "1"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO-3, 2 rank(s) on cpu" in proc.stdout
    assert "Same tokens as plain generate: True" in proc.stdout
