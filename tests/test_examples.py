"""The single-file example runs and raises its score."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ppo_single_file.py"


@pytest.mark.slow
def test_single_file_ppo_example_improves_the_score(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("ppo_single_file", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up
    spec.loader.exec_module(example)
    result = example.main(["--iterations", "10", "--batch-size", "32"])
    assert result["score_after"] > result["score_before"] + 0.05
    assert "clipfrac" in capsys.readouterr().out
