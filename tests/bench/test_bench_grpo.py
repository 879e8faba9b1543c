"""bench/grpo.py's TRL + vLLM side on vLLM's CPU build trains a 2-step run on the tiny model and reports its figures
(no timing checks; ft's vLLM sides are exercised by test_grpo_vllm_real), and issue 21's targets are computed right.

The sides run in the vLLM environment (``$FT_VLLM_PYTHON``, default ``.venv-vllm/bin/python``, made by
``bash .ci/vllm-env.sh`` with TRL in it); without it the test is skipped here and fails under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_grpo_vllm_real import vllm_environment

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "grpo.py"

pytestmark = [pytest.mark.slow]


def test_trl_and_ft_with_vllm_colocate_train_side_by_side(tmp_path):
    python = vllm_environment(("vllm", "trl"), "the vLLM bench sides")
    out = tmp_path / "grpo.json"
    env = {**os.environ, "FT_VLLM_PYTHON": python, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH), "--sides", "trl-vllm-colocate", "--repeats",
                           "1", "--steps", "2", "--max-completion-len", "8", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    report = json.loads(out.read_text())
    [run] = report["runs"]["trl-vllm-colocate"]  # ft's vLLM sides run in test_grpo_vllm_real (engine starts are slow)
    assert run["steps"] == 2 and run["prompts_per_second"] > 0, run
    # the vLLM engine sampled with (about) the trainer's weights after each sync: TRL's sync went through
    assert 0.9 < run["is_mean"] < 1.1, run


def test_issue_21_targets_are_computed_from_the_sides_a_run_had():
    sys.path.insert(0, str(BENCH.parent))
    try:
        from grpo import targets
    finally:
        sys.path.remove(str(BENCH.parent))
    medians = {"trl": 1.0, "trl-vllm-colocate": 2.0, "ft": 1.0, "ft-vllm-colocate": 2.6, "ft-vllm-colocate-async": 3.5,
               "ft-vllm-server": 3.1}
    runs = {"ft-vllm-colocate": [{"sync_bytes": 40.0}], "ft-vllm-server": [{"sync_bytes": 60.0}], "ft": [{}]}
    out = targets(medians, runs, 1000, lora=True)
    assert out["vllm_over_ft_hf"] == {"value": 3.1, "wanted": 3.0, "met": True}  # the faster vLLM side
    assert out["vllm_over_best_trl"] == {"value": 1.55, "wanted": 1.3, "met": True}  # against TRL's faster side
    assert out["async_over_sync"] == {"value": 1.346, "wanted": 1.3, "met": True}
    assert out["lora_sync_share_of_full"] == {"value": 0.05, "wanted": 0.1, "met": True}
    assert "lora_sync_share_of_full" not in targets(medians, runs, 1000, lora=False)  # full weights: not the target
    assert targets({"trl": 1.0, "ft": 2.0}, {}, 1000, lora=False) == {}
