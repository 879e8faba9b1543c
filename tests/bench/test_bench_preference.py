"""bench/preference.py runs both sides on the tiny model and reports them side by side (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_bench_reports_ft_and_trl_on_the_same_pairs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "preference.py"), "--model", "tiny", "--pairs", "16",
                           "--steps", "2", "--repeats", "1", "--configs", "trl,ft", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    trl, ft = report["results"]["trl"], report["results"]["ft"]
    assert trl["repeats"][0]["tokens"] == ft["repeats"][0]["tokens"] > 0  # the same pairs in the same order
    assert trl["repeats"][0]["first_loss"] == pytest.approx(ft["repeats"][0]["first_loss"]) == pytest.approx(0.6931, abs=1e-4)
    assert set(report["comparison"]["ft"]) == {"speedup_vs_trl", "wall_speedup_vs_trl", "rss_ratio_vs_trl"}
    assert all(v > 0 for v in report["comparison"]["ft"].values())
