"""bench/vs_trl.py --tiny runs ft and TRL side by side and prints the figures it promises (no timing checks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_bench_train import load_bench

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    yield from load_bench(BENCH, "ft_bench_vs_trl")


def test_tiny_run_trains_both_sides_on_the_same_tokens(bench, tmp_path, capsys):
    out = tmp_path / "vs_trl.json"
    report = bench.main(["--tiny", "--steps", "3", "--work", str(tmp_path / "work"), "--out", str(out)])

    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(printed) >= {"machine", "versions", "recipe", "results", "checks"}
    assert printed["recipe"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    assert list(printed["results"]) == ["padded", "packed"]

    for mode, sides in printed["results"].items():
        assert list(sides) == ["ft", "trl"]
        for side, summary in sides.items():
            [run] = summary["runs"]
            assert "error" not in run, run.get("log_tail")
            assert run["steps"] == 3 and len(run["losses"]) == 3, (mode, side)
            assert all(math.isfinite(x) for x in run["losses"]), (mode, side)
            assert run["losses"][-1] != run["losses"][0], f"{mode} {side}: the loss did not move"
            assert run["tokens"] > run["trained_tokens"] > 0
            assert run["tokens_per_second"] > 0 and run["peak_rss_gb"] > 0 and run["train_peak_rss_gb"] > 0
            assert summary["median"]["tokens_per_second"] == run["tokens_per_second"]
        assert set(printed["checks"][mode]) == {"tokens_per_second_ratio", "tokens_per_cpu_second_ratio",
                                                "peak_rss_ratio", "ft_at_least_as_fast", "ft_at_most_as_much_memory"}

    padded = printed["results"]["padded"]
    ft, trl = padded["ft"]["runs"][0], padded["trl"]["runs"][0]
    # unpacked, TRL gets ft's tokenized rows in ft's order: the same batches, the same tokens
    assert ft["tokens_per_step"] == trl["tokens_per_step"] and ft["trained_tokens"] == trl["trained_tokens"]
    assert any("[fused_loss]" in p for p in ft["patches"])
    # TRL's chunked loss is its default: "chunked_nll" up to 1.15, "nll" (same computation) from 1.16
    trl_version = tuple(int(x) for x in printed["versions"]["trl"].split(".")[:2])
    assert trl["trl"]["loss_type"] == ("nll" if trl_version >= (1, 16) else "chunked_nll")
    assert printed["results"]["packed"]["trl"]["runs"][0]["trl"]["padding_free"] is True


def test_unknown_mode_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--modes", "padded,sparse"])
    assert "unknown mode(s) or side(s) ['sparse']" in capsys.readouterr().err
