"""bench/fault_campaign.py (issue 22's campaign, repeated) keeps working: a few of its cases, run for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def campaign(tmp_path: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "fault_campaign.py"), "--work", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=900)
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report["held"] == report["tried"] else 1), proc.stderr[-3000:]
    return report


def test_hostile_configs_are_tried_and_checked(tmp_path):
    report = campaign(tmp_path, "--areas", "hostile_config", "--only", "alias_bomb: ft validate,non_utf8: ft run")
    area = report["areas"]["hostile_config"]
    assert area["cases"] == ["alias_bomb: ft validate", "non_utf8: ft run"]
    assert area["tried"] == area["held"] == 2, area["not_held"]


@pytest.mark.slow
def test_kill9_during_training_and_inside_the_final_save_is_checked_against_an_uninterrupted_run(tmp_path):
    report = campaign(tmp_path, "--areas", "kill9", "--methods", "sft")
    area = report["areas"]["kill9"]
    assert area["cases"] == ["sft: kill -9 at step 3 of 5, resume from checkpoint-2", "sft: kill -9 inside the final save, rerun"]
    assert area["tried"] == area["held"] == 2, area["not_held"]


def test_a_case_that_does_not_hold_is_reported_with_what_happened(tmp_path, monkeypatch):
    """The checks are real: an ft error with the wrong exit code, or a traceback, is not 'held'."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import fault_campaign
    finally:
        sys.path.remove(str(REPO / "bench"))
    result = subprocess.CompletedProcess([], 1, "", "Traceback (most recent call last):\n  KeyError: 'labels'")
    assert fault_campaign.ft_error(result).startswith("a traceback (exit 1)")
    assert fault_campaign.ft_error(subprocess.CompletedProcess([], 0, "", "fine")).startswith("exit 0, not 2")
    assert fault_campaign.ft_error(subprocess.CompletedProcess([], 2, "", "error: x"), "y").startswith("the message lacks")
    (tmp_path / "a").write_text("1")
    before = fault_campaign.snapshot(tmp_path)
    (tmp_path / "a").write_text("2")
    assert fault_campaign.same_files(before, tmp_path) == f"files in {tmp_path.name} changed: ['a']"
