"""Benchmark `ft preprocess`: whole-process tokens/s, peak memory, packing efficiency, turn scaling.

    python bench/preprocess.py                 # 20k conversations of 1-6 turns + turn scaling
    python bench/preprocess.py --conversations 5000 --no-scaling

Generates a multi-turn chat set with a seed into a temporary directory, makes the tiny
tokenizer (``ft.tools.tiny``), and runs ``ft preprocess`` as a subprocess with a fresh cache
directory (cold), so the figures include process start, imports, reading, tokenizing,
packing and writing the cache. Peak memory is sampled over the whole process tree (the
command and its tokenization workers): ``peak_rss_mb`` sums RSS (shared pages counted once
per process, an upper bound) and ``peak_pss_mb`` sums PSS (shared pages split between
processes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORDS = (
    "the a of to in and is it that for on with as was at by be this are from or have not but what all were when we "
    "there can your which their said if do will each about how up out them then she many some so these would other "
    "into has more her two like him see time could no make than first been its who now people my made over did down "
    "only way find use may water long little very after words called just where most know model train data token "
    "loss learning rate batch sequence label mask chat user assistant system answer question hello thanks please "
    "yes sure capital france paris germany berlin italy rome spain madrid python code function return value list"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    if rng.random() < 0.3:
        words.append(str(rng.randint(0, 9999)))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!"])


def conversation(rng: random.Random, turns: int, user=(8, 40), assistant=(20, 120)) -> dict[str, Any]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": sentence(rng, 5, 15)})
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng, *user)})
        messages.append({"role": "assistant", "content": sentence(rng, *assistant)})
    return {"messages": messages}


def write_set(path: Path, n: int, seed: int, turns: int | None = None, **kw: Any) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps(conversation(rng, turns or rng.randint(1, 6), **kw)) + "\n")
    return path


class TreeMemory:
    """Samples the memory of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        tick = 0
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    if tick % 4 == 0:
                        pss += getattr(p.memory_full_info(), "pss", 0)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            if tick % 4 == 0:
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_preprocess(config: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run `ft preprocess` cold in a subprocess; return wall time, peak memory and the cache stats."""
    import yaml

    prepared = work / f"prepared-{name}"
    config = {**config, "dataset_prepared_path": str(prepared)}
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "FT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    m = measure_command([sys.executable, "-m", "ft.cli", "preprocess", str(cfg_path)], env=env, what="ft preprocess")
    [cache_dir] = [p for p in prepared.iterdir() if p.is_dir() and not p.name.startswith(".")]
    stats = json.loads((cache_dir / "stats.json").read_text())
    return {"seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"], "peak_rss_mb": m["peak_rss"] / 2**20,
            "peak_pss_mb": m["peak_pss"] / 2**20, "stats": stats, "load_average": m["load_average"]}


def measure_command(cmd: list[str], *, env: dict[str, str], what: str, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` cold as a subprocess: wall and CPU seconds, peak memory of its process tree."""
    load_before = os.getloadavg()[0]
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{output[-4000:]}")
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": mem.peak_rss, "peak_pss": mem.peak_pss,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_axolotl(axolotl: str, model: Path, data: Path, sequence_len: int, work: Path) -> dict[str, Any]:
    """``axolotl preprocess`` on the same data, tokenizer and sequence_len, cold, as a subprocess."""
    import yaml

    cfg = {
        "base_model": str(model), "datasets": [{"path": str(data), "type": "chat_template", "ds_type": "json",
                                                 "field_messages": "messages"}],
        "chat_template": "tokenizer_default", "dataset_prepared_path": str(work / "axolotl-prepared"),
        "sequence_len": sequence_len, "sample_packing": True, "output_dir": str(work / "axolotl-out"),
        "micro_batch_size": 1, "gradient_accumulation_steps": 1, "num_epochs": 1, "learning_rate": 1e-5,
        "optimizer": "adamw_torch", "val_set_size": 0.0,
    }
    path = work / "axolotl.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "HF_DATASETS_CACHE": str(work / "hf-cache")}
    m = measure_command([axolotl, "preprocess", str(path)], env=env, cwd=work, what="axolotl preprocess")
    return {"seconds": round(m["seconds"], 3), "cpu_seconds": round(m["cpu_seconds"], 3),
            "peak_rss_mb": round(m["peak_rss"] / 2**20, 1), "peak_pss_mb": round(m["peak_pss"] / 2**20, 1),
            "load_average_before_after": m["load_average"]}


@contextlib.contextmanager
def stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=20000)
    ap.add_argument("--sequence-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc (default: all cores)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the turns-scaling runs")
    ap.add_argument("--scaling-turns", type=int, default=40000, help="total turns per scaling run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--axolotl", default=None, metavar="BIN",
                    help="also run this `axolotl` executable's preprocess on the same set, right after ft's")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    with stdout_to_stderr():  # libraries print warnings on stdout; keep it for the JSON
        from ft.tools.tiny import make_tiny

        model = make_tiny(work / "tiny")
    base = {"base_model": str(model), "sequence_len": args.sequence_len, "seed": args.seed}
    if args.num_proc:
        base["dataset_num_proc"] = args.num_proc

    data = write_set(work / "chat.jsonl", args.conversations, args.seed)
    main_cfg = {**base, "plugins": ["packing"], "datasets": [{"path": str(data), "type": "chat_template"}]}
    r = run_preprocess(main_cfg, work, "main")
    s = r["stats"]
    result: dict[str, Any] = {
        "conversations": args.conversations,
        "rows": s["rows"],
        "samples": s["samples"],
        "tokens": s["tokens"],
        "trained_tokens": s["trained_tokens"],
        "dropped": s["dropped"],
        "seconds": round(r["seconds"], 3),
        "tokens_per_s": round(s["tokens"] / r["seconds"]),
        "cpu_seconds": round(r["cpu_seconds"], 3),
        "tokens_per_cpu_s": round(s["tokens"] / r["cpu_seconds"]),
        "in_process_seconds": s["seconds"],
        "stage_seconds": {k: s.get(k) for k in ("read_seconds", "tokenize_seconds", "assemble_seconds",
                                                 "pack_seconds", "write_seconds")},
        "load_average_before_after": r["load_average"],
        "peak_rss_mb": round(r["peak_rss_mb"], 1),
        "peak_pss_mb": round(r["peak_pss_mb"], 1),
        "sequence_len": args.sequence_len,
        "packing_efficiency": s.get("packing_efficiency"),
        "bins": s.get("bins"),
        "fewest_possible_bins": -(-s["tokens"] // args.sequence_len),
        "cpu_count": os.cpu_count(),
        "num_proc": args.num_proc or "all cores",
    }

    if args.axolotl:
        axo = run_axolotl(args.axolotl, model, data, args.sequence_len, work)
        axo["tokens_per_s"] = round(s["tokens"] / axo["seconds"])  # same data and tokenizer: ft's token count
        axo["tokens_per_cpu_s"] = round(s["tokens"] / axo["cpu_seconds"])
        result["axolotl"] = axo
        result["speedup_vs_axolotl"] = {"wall": round(axo["seconds"] / r["seconds"], 2),
                                        "cpu": round(axo["cpu_seconds"] / r["cpu_seconds"], 2)}

    if not args.no_scaling:
        scaling = {}
        for turns in (5, 10, 20, 40, 80):
            n = max(args.scaling_turns // turns, 1)
            path = write_set(work / f"turns{turns}.jsonl", n, args.seed, turns=turns, user=(4, 12), assistant=(8, 30))
            cfg = {**base, "sequence_len": 65536, "datasets": [{"path": str(path), "type": "chat_template"}]}
            rr = run_preprocess(cfg, work, f"turns{turns}")
            ss = rr["stats"]
            scaling[turns] = {
                "conversations": n, "tokens": ss["tokens"],
                "seconds_per_token": rr["seconds"] / ss["tokens"],
                "tokenize_seconds_per_token": ss["tokenize_seconds"] / ss["tokens"],
                "cpu_seconds_per_token": rr["cpu_seconds"] / ss["tokens"],
            }
        result["turn_scaling"] = scaling
        result["turn_scaling_ratio_80_vs_5"] = {
            "whole_process": round(scaling[80]["seconds_per_token"] / scaling[5]["seconds_per_token"], 3),
            "tokenize_stage": round(scaling[80]["tokenize_seconds_per_token"] / scaling[5]["tokenize_seconds_per_token"], 3),
            "cpu": round(scaling[80]["cpu_seconds_per_token"] / scaling[5]["cpu_seconds_per_token"], 3),
        }
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        result["work_dir"] = str(work)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
