"""bench/train.py runs on a CPU with the tiny model and prints the figures it promises (no timing checks)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ft_bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_cpu_tiny_run_prints_figures_for_each_configuration(bench, tmp_path, capsys):
    configs = ["plain_full", "ft_full", "ft_full_liger", "ft_lora"]
    out = tmp_path / "bench.json"
    report = bench.main(["--device", "cpu", "--tiny", "--steps", "3", "--warmup", "1",
                         "--configs", ",".join(configs), "--work", str(tmp_path / "work"), "--out", str(out)])

    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(printed) >= {"device", "versions", "setup", "mfu_definition", "results", "comparisons"}
    assert printed["setup"]["parameters"] > 0 and printed["setup"]["tokens_per_step"] == 4 * 256
    assert list(printed["results"]) == configs

    for name in ("plain_full", "ft_full", "ft_lora"):
        r = printed["results"][name]
        assert "error" not in r, r.get("traceback")
        assert r["tokens_per_second"] > 0 and r["mfu"] >= 0 and r["peak_gib"] > 0
        assert len(r["losses"]) == 3 and r["timed_steps"] == 2
        assert r["loss_last"] == r["losses"][-1]
    assert any("ft_varlen" in p for p in printed["results"]["ft_full"]["patches"])
    # Liger cannot run on a CPU: the configuration reports ft's one-sentence reason
    assert "no CUDA GPU" in printed["results"]["ft_full_liger"]["skipped"]

    full = printed["comparisons"]["ft_full_vs_plain_full"]
    assert full["speedup"] > 0
    assert full["loss_rel_diff"] < 0.05  # same data, seed and learning rate: the losses stay close
    assert "ft_lora_vs_plain_full" not in printed["comparisons"]  # LoRA is compared with the plain LoRA loop only


def test_unknown_configuration_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--configs", "ft_full,ft_fast"])
    assert "unknown configuration(s) ['ft_fast']" in capsys.readouterr().err
