"""verl issue #6280 reproduced with verl 0.9.1's own FSDP engine (tests/verl_engine_worker.py, in a
child process: verl's platform, the process group and the mode's aten overrides are process-wide):
with ppo_fast installed into verl, the log-probs of the same sequences differ between micro-batch
sizes and between ``compute_log_prob``'s path and the update's; with
``install(batch_invariant=True)`` they are bitwise equal; ``uninstall()`` brings the mismatch back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import subprocess_env  # noqa: E402

pytest.importorskip("verl")
pytest.importorskip("tensordict")

WORKER = Path(__file__).resolve().parents[1] / "verl_engine_worker.py"
COMPARISONS = ("old_log_prob micro-batch 1 vs 4", "old_log_prob at 4 vs update log_prob at 2")


@pytest.mark.slow
@pytest.mark.parametrize("remove_padding", [1], ids=["packed"])  # verl's default; padded: the same, measured
def test_old_log_prob_equals_log_prob_across_micro_batch_sizes_under_the_switch(remove_padding):
    proc = subprocess.run([sys.executable, str(WORKER), "--remove-padding", str(remove_padding)],
                          env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["report"] == {
        "verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.forward_step": "under batch_invariant()"}
    for comparison in COMPARISONS:
        # float32 with hidden 256: torch's CPU GEMM depends on M (the packed token count) here.
        assert not result["off"][comparison]["equal"] and result["off"][comparison]["max_abs_diff"] > 0, comparison
        assert result["on"][comparison] == {"max_abs_diff": 0.0, "equal": True}, comparison
        assert not result["after uninstall"][comparison]["equal"], comparison


@pytest.mark.slow
def test_the_switch_is_checked_and_the_plugin_needs_both_variables():
    import ppo_fast.integrations.verl as pf_verl

    with pytest.raises(TypeError, match="batch_invariant must be a bool, got 'yes'"):
        pf_verl.install(batch_invariant="yes")
    assert not pf_verl.batch_invariant_installed()
    proc = subprocess.run([sys.executable, "-c", "import ppo_fast.integrations.verl.plugin"],
                          env=subprocess_env(PPO_FAST_VERL_BATCH_INVARIANT="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0
    assert "PPO_FAST_VERL_BATCH_INVARIANT=1 does nothing without PPO_FAST_VERL=1" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import ppo_fast.integrations.verl as v, "
                           "ppo_fast.integrations.verl.plugin; print(v.batch_invariant_installed())"],
                          env=subprocess_env(PPO_FAST_VERL="1", PPO_FAST_VERL_BATCH_INVARIANT="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"
