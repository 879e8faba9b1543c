"""DPO throughput and memory: ``ft run`` (method: dpo) against TRL's DPOTrainer, same data and model.

    python bench/preference.py                                  # SmolLM2-135M if present, CPU
    python bench/preference.py --model tiny --steps 3 --repeats 1   # CI-sized: the tiny model
    python bench/preference.py --device cuda --model /path/to/model --batch 8 --steps 10

Both sides train DPO (sigmoid, beta 0.1) with the same model, the same preference pairs (a
conversational ``{prompt, chosen, rejected}`` file, rendered with the model's chat template by
each side), ``--batch`` pairs per optimizer step, the same learning rate, seed and steps, a
reference model kept in memory (TRL: a second copy loaded from the path; ft: a frozen copy), no
gradient checkpointing. Each configuration runs in its own subprocess, so its peak RSS (getrusage
``ru_maxrss``: the whole process, model loading included) is its own; the machine may be shared,
so every configuration runs ``--repeats`` times, interleaved, and medians are reported.

Configurations: ``trl`` (DPOTrainer, defaults), ``ft`` (ft's default: one row per pair, its prompt
computed once for both sides), ``ft_packed`` (``-p packing``: pairs packed padding-free, block-diagonal mask; as
many bins per step as hold about ``--batch`` pairs). On a CPU the mask makes attention
cost grow with the square of the bin's length (2 x ``sequence_len``), so packing pays off where
attention is varlen (flash attention on a GPU); on a CPU ``ft`` is the faster configuration. Both sides read the pairs in file order
(sequential sampler), so the unpacked configurations train on the same pairs at every step.

Tokens/s counts the pairs' real tokens (prompt + chosen and prompt + rejected, no padding; ft's
shared-prompt rows compute each prompt once but are counted the same way) of the timed steps over
their wall time; the first ``--warmup`` steps are not timed. Tokens per CPU-second
divides by the process's CPU time in the same steps instead: with one thread per run (the
default) it measures the work a configuration does, and stays put when other jobs load the
machine, which wall time does not; the comparison uses it, and reports the wall-time ratio too. Printed JSON (also
``--out``): per configuration the median and every repeat's tokens/s, peak RSS (MiB) and first
loss, and ``comparison`` (each ft configuration's speed-up and RSS ratio against trl).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SMOLLM2 = "/work/models/smollm2-135m-instruct"
CONFIGS = ("trl", "ft", "ft_packed")
WORDS = ("the model learns which answer people prefer and why a short clear reply often wins over a long one "
         "data token loss batch sequence label mask chat user assistant system answer question hello thanks "
         "please yes sure capital france paris germany berlin italy rome spain madrid one two three four five "
         "six seven eight nine ten red green blue cat dog bird fish tree sun moon star add subtract number "
         "result python code function return value list print write read file").split()


def make_pairs(n: int, seed: int, prompt_words: int, answer_words: int) -> list[dict[str, Any]]:
    """Conversational pairs; prompt and answer lengths lognormal around the given medians."""
    rng = random.Random(seed)

    def text(median: int) -> str:
        k = max(3, min(int(rng.lognormvariate(0, 0.5) * median), int(2.5 * median)))
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    return [{"prompt": [{"role": "user", "content": text(prompt_words)}],
             "chosen": [{"role": "assistant", "content": text(answer_words)}],
             "rejected": [{"role": "assistant", "content": text(answer_words)}]} for _ in range(n)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StepClock:
    """Wall time of the optimizer steps after the warm-up ones, and the real tokens they held."""

    def __init__(self, warmup: int):
        self.warmup, self.step = warmup, 0
        self.started: float | None = None
        self.cpu_started = 0.0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.batch_tokens: list[int] = []
        self.losses: list[float] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.started, clock.cpu_started = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kwargs):
                if clock.step >= clock.warmup and clock.started is not None:
                    clock.seconds += time.perf_counter() - clock.started
                    clock.cpu_seconds += time.process_time() - clock.cpu_started
                clock.step += 1

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))

        return Timer()

    def counting(self, collate: Any, count: Any) -> Any:
        def wrapped(rows):
            batch = collate(rows)
            self.batch_tokens.append(int(count(rows, batch)))
            return batch

        return wrapped

    def result(self, batches_per_step: int = 1) -> dict[str, Any]:
        timed = self.batch_tokens[self.warmup * batches_per_step: self.step * batches_per_step]
        tokens = sum(timed)
        return {"timed_steps": self.step - self.warmup, "tokens": tokens, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3),
                "tokens_per_second": round(tokens / self.seconds, 2) if self.seconds else None,
                "tokens_per_cpu_second": round(tokens / self.cpu_seconds, 2) if self.cpu_seconds else None,
                "first_loss": self.losses[0] if self.losses else None, "peak_rss_mib": round(peak_rss_mib(), 1)}


# -- the two sides, each in its own process ---------------------------------------------------------


def run_trl(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(a["seed"])
    tokenizer = AutoTokenizer.from_pretrained(a["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = a["pad_token"]
    rows = [json.loads(line) for line in Path(a["data"]).read_text().splitlines()]
    dtype = torch.bfloat16 if a["device"] == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype)
    args = DPOConfig(output_dir=a["work"], per_device_train_batch_size=a["batch"], max_steps=a["warmup"] + a["steps"],
                     learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=a["device"] == "cpu", bf16=a["device"] == "cuda",
                     beta=0.1, max_length=a["sequence_len"], seed=a["seed"], dataloader_num_workers=0,
                     gradient_checkpointing=False, disable_tqdm=True, train_sampling_strategy="sequential")
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    clock = StepClock(a["warmup"])
    trainer.add_callback(clock.callback())
    trainer.data_collator = clock.counting(trainer.data_collator, lambda rows, b: b["attention_mask"].sum())
    trainer.train()
    return clock.result()


def run_ft(a: dict[str, Any], plugins: list[str]) -> dict[str, Any]:
    import ft.run
    from ft import hookimpl
    from ft.kernel.plugins import add_process_plugin

    clock = StepClock(a["warmup"])

    class Probe:
        @hookimpl
        def ft_callbacks(self, cfg):
            return [clock.callback()]

        @hookimpl
        def ft_trainer_args(self, cfg):
            return {"train_sampling_strategy": "sequential"}  # file order, as the TRL side

        @hookimpl
        def ft_before_train(self, cfg, trainer, model):
            trainer.data_collator = clock.counting(trainer.data_collator, pair_tokens)

    add_process_plugin("bench_probe", Probe())
    config = {
        "base_model": a["model"], "method": "dpo", "dpo": {"beta": 0.1},
        "datasets": [{"path": a["data"], "type": "preference"}], "plugins": plugins, "shuffle": False,
        "sequence_len": a["sequence_len"], "micro_batch_size": a["bins"] if "packing" in plugins else a["batch"],
        "max_steps": a["warmup"] + a["steps"], "learning_rate": a["lr"], "lr_scheduler": "constant",
        "logging_steps": 1, "seed": a["seed"], "bf16": a["device"] == "cuda", "dataset_num_proc": 1,
        "dataset_prepared_path": str(Path(a["work"]) / "prepared"), "output_dir": str(Path(a["work"]) / "out"),
    }
    if a["pad_token"]:
        config["special_tokens"] = {"pad_token": a["pad_token"]}
    with contextlib.redirect_stdout(sys.stderr):
        ft.run.run(config, overwrite=True)
    return clock.result()


def pair_tokens(rows: list[dict[str, Any]], batch: Any) -> int:
    """The pairs' tokens: prompt + chosen and prompt + rejected (what TRL's batch holds), however ft
    lays them out (a shared prompt is computed once but counted twice here; a packed bin is its tokens)."""
    return sum(len(r["input_ids"]) if "input_ids" in r else len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
               for r in rows)


def worker(name: str, a: dict[str, Any]) -> None:
    os.environ.setdefault("FT_NO_PROGRESS", "1")
    if name == "trl":
        out = run_trl(a)
    else:
        out = run_ft(a, {"ft": [], "ft_packed": ["packing"]}[name])
    print("RESULT " + json.dumps(out), flush=True)


# -- the benchmark ------------------------------------------------------------------------------------


def pack_bins(a: dict[str, Any], work: Path) -> tuple[int, float]:
    """Packed bins per micro-batch that hold about ``batch`` pairs, from ft's own packing of the data."""
    from ft.engine.data import prepare_datasets
    from ft.kernel.context import load_context

    config = {"base_model": a["model"], "method": "dpo", "datasets": [{"path": a["data"], "type": "preference"}],
              "plugins": ["packing"], "sequence_len": a["sequence_len"], "dataset_num_proc": 1,
              "dataset_prepared_path": str(work / "probe"), "shuffle": False}
    if a["pad_token"]:
        config["special_tokens"] = {"pad_token": a["pad_token"]}
    with contextlib.redirect_stdout(sys.stderr):
        ctx = load_context(config)
        data = prepare_datasets(ctx, ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg))
    if data.report["dropped_total"]:
        raise SystemExit(f"ft dropped {data.report['dropped_total']} pairs (TRL would truncate them): raise "
                         "--sequence-len so that both sides train on the same pairs")
    pairs_per_bin = data.stats["samples"] / data.stats["bins"]
    return max(1, round(a["batch"] / pairs_per_bin)), round(pairs_per_bin, 2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory, or 'tiny' (default: SmolLM2-135M if present)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sequence-len", type=int, default=512, help="no pair is longer: both sides train on all pairs")
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--answer-words", type=int, default=40)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=1,
                   help="threads per run (OMP_NUM_THREADS); 1 by default: on a shared machine more threads spin-wait")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--args", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        worker(ns.worker, json.loads(ns.args))
        return {}

    work = Path(tempfile.mkdtemp(prefix="ft-bench-pref-"))
    model = ns.model or (SMOLLM2 if Path(SMOLLM2).is_dir() else "tiny")
    pad_token = None
    if model == "tiny":
        from ft.tools.tiny import make_tiny

        model = str(make_tiny(work / "tiny"))
        pad_token = "<|reserved_0|>"
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(ns.pairs, 0, ns.prompt_words, ns.answer_words)))
    a = {"model": model, "data": str(data), "device": ns.device, "batch": ns.batch, "steps": ns.steps,
         "warmup": ns.warmup, "sequence_len": ns.sequence_len, "lr": 1e-6, "seed": 0, "pad_token": pad_token}
    a["bins"], pairs_per_bin = pack_bins(a, work)  # also checks that ft keeps every pair
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(ns.threads)
    if ns.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    configs = [c for c in ns.configs.split(",") if c]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(ns.repeats):
        for name in configs:  # interleaved, so a busy spell of the machine hits every configuration
            args = {**a, "work": str(work / f"{name}-{r}")}
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--args", json.dumps(args)],
                                  env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            runs[name].append(json.loads(line[len("RESULT "):]))
            print(f"{name} repeat {r + 1}: {runs[name][-1]}", file=sys.stderr, flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    results = {name: {"tokens_per_cpu_second": median(name, "tokens_per_cpu_second"),
                      "tokens_per_second": median(name, "tokens_per_second"),
                      "peak_rss_mib": median(name, "peak_rss_mib"), "repeats": runs[name]} for name in configs}
    comparison = {}
    if "trl" in results:
        trl_result = results["trl"]
        for name in configs:
            if name != "trl":
                comparison[name] = {
                    "speedup_vs_trl": round(results[name]["tokens_per_cpu_second"] / trl_result["tokens_per_cpu_second"], 3),
                    "wall_speedup_vs_trl": round(results[name]["tokens_per_second"] / trl_result["tokens_per_second"], 3),
                    "rss_ratio_vs_trl": round(results[name]["peak_rss_mib"] / trl_result["peak_rss_mib"], 3),
                }
    import torch
    import transformers
    import trl

    report = {
        "setup": {"model": model, "device": ns.device, "pairs": ns.pairs, "pairs_per_step": ns.batch,
                  "packed_bins_per_step": a["bins"], "pairs_per_bin": pairs_per_bin, "timed_steps": ns.steps, "warmup_steps": ns.warmup,
                  "repeats": ns.repeats, "sequence_len": ns.sequence_len, "threads": ns.threads,
                  "load_average": os.getloadavg(), "cpus": os.cpu_count(), "platform": platform.platform(),
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__}},
        "results": results,
        "comparison": comparison,
        "target": {"speedup_at_least": 1.5, "rss_at_most": 1.0,
                   "met": {k: v["speedup_vs_trl"] >= 1.5 and v["rss_ratio_vs_trl"] <= 1.0 for k, v in comparison.items()}},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if ns.out:
        Path(ns.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
