"""ft against TRL's SFTTrainer on the same recipe: tokens/s and peak memory, side by side in one run.

    python bench/smollm2.py                       # once: SmolLM2-135M-Instruct in /work/models/ (see there)
    python bench/vs_trl.py                        # SmolLM2 LoRA recipe, padded and packed, 3 alternations
    python bench/vs_trl.py --tiny                 # CI-sized: the tiny model of ft.tools.tiny, a few steps
    python bench/vs_trl.py --modes padded --repeat 5 --sides ft,trl,ft_baseline --out result.json

The recipe (issue 18): LoRA r=16, alpha 32 on all linear layers, no dropout, micro_batch_size 8,
sequence_len 512, learning rate 1e-3 with cosine decay and no warmup, 10 steps, fp32, no gradient
checkpointing, assistant tokens only, on a multi-turn chat JSONL (a synthetic one written here,
or ``--data``). Mode ``padded``: no packing (TRL as it is by default, ``padding_free=False``);
mode ``packed``: ft with ``plugins: [packing]`` against TRL's ``packing=True`` (best-fit
decreasing, which turns on ``padding_free``). Each side keeps its own defaults otherwise (TRL's
``loss_type`` is its chunked loss: ``chunked_nll`` up to TRL 1.15, ``nll`` from 1.16 on, where
``chunked_nll`` became its deprecated alias; both use the fused AdamW), with ``gradient_checkpointing=False``
for TRL, which turns it on by default.

Same data: ft tokenizes the JSONL with its ``chat_template`` format (assistant turns and their
end-of-turn token trained); TRL is handed those very rows (``input_ids`` and ``labels``), in the
same order, so unpacked both see the same batches. Every micro-batch's real tokens (padding
excluded) and trained tokens are counted as the trainer consumes it, the same way on both sides.
The adapter's initial weights are drawn from the same seeded random state on both sides.

Each side runs in its own subprocess, so peak memory is that process's own high-water mark
(``ru_maxrss`` from ``wait4``), not a shared one; the RSS sampled during the steps is reported too.
Sides alternate (ft, TRL, then TRL, ft, ...) ``--repeat`` times on a machine others may be using,
and the medians are compared. Throughput counts the steps after the first (warm-up): real tokens
divided by the wall time from the end of step 1 to the end of the last step (data loading,
collation, callbacks and logging included). Side ``ft_baseline`` is ft as it was before issue 18
(``-p no:fused_loss``, ``optimizer: adamw_torch``), for comparison.

Prints JSON: per mode and side every run and the medians (tokens/s, peak RSS, loss per step),
and ``checks``: whether ft's median tokens/s >= TRL's and ft's median peak RSS <= TRL's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path("/work/models/smollm2-135m-instruct")
SIDES = ("ft", "trl", "ft_baseline")
MODES = ("padded", "packed")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


# -- data ----------------------------------------------------------------------------------------

SUBJECTS = ("the train timetable", "a recipe", "the garden", "my code", "the budget", "a poem", "the weather report",
            "the meeting notes", "a bicycle", "the library")
VERBS = ("plan", "fix", "describe", "improve", "summarise", "explain", "check", "organise")
ASIDES = ("Please be brief.", "I am in a hurry.", "Thanks!", "What do you think?", "It has {n} parts.")
FACTS = ("It takes about {n} minutes.", "There are {n} steps in total.", "The answer is {n}.", "You need {n} items.",
         "Start with step one, then continue with the next {n} steps in order.", "It costs {n} euros, including tax.")


def conversation(rng: random.Random) -> dict[str, Any]:
    """One multi-turn chat (1-4 exchanges, sometimes a system prompt) with numbers the model can learn."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a concise, friendly assistant."})
    for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
        subject, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
        asides = " ".join(rng.choice(ASIDES).format(n=rng.randint(2, 99)) for _ in range(rng.randint(0, 3)))
        n = rng.randint(2, 60)
        facts = " ".join(rng.choice(FACTS).format(n=n + i) for i in range(rng.randint(1, 4)))
        messages += [{"role": "user", "content": f"Can you help me {verb} {subject}? {asides}".strip()},
                     {"role": "assistant", "content": f"Sure, here is how to {verb} {subject}. {facts}"}]
    return {"messages": messages}


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)))
    return path


def ft_config(spec: dict[str, Any], side: str) -> dict[str, Any]:
    """The ft config of the recipe (``ft_baseline``: as ft trained before issue 18)."""
    cfg: dict[str, Any] = {
        "base_model": spec["model_dir"],
        "plugins": ["lora", *(["packing"] if spec["mode"] == "packed" else [])],
        "datasets": [{"path": spec["data"], "type": "chat_template", "roles_to_train": ["assistant"],
                      "train_on_eos": "turn"}],
        "sequence_len": spec["sequence_len"],
        "micro_batch_size": spec["micro_batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["steps"],
        "learning_rate": spec["learning_rate"],
        "lr_scheduler": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": False,
        "logging_steps": 1,
        "seed": spec["seed"],
        "dataset_num_proc": 1,
        "dataset_prepared_path": str(Path(spec["work"]) / "prepared"),
        "output_dir": str(Path(spec["work"]) / "runs" / f"{side}-{spec['mode']}"),
        "lora": dict(LORA),
    }
    if side == "ft_baseline":
        cfg["optimizer"] = "adamw_torch"
    return cfg


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokenize with ft (into its cache, which the ft runs then reuse) and write the rows TRL gets."""
    from ft.kernel.context import load_context
    from ft.run import preprocess

    with contextlib.redirect_stdout(sys.stderr):
        data, _ = preprocess(load_context({**ft_config({**spec, "mode": "padded"}, "ft"), "plugins": ["lora"]}))
    rows_path = Path(spec["work"]) / "tokens.jsonl"
    ids, labels = data.train["input_ids"], data.train["labels"]
    with rows_path.open("w") as f:
        for i, lab in zip(ids, labels, strict=True):
            f.write(json.dumps({"input_ids": list(i), "labels": list(lab)}) + "\n")
    lengths = sorted(len(i) for i in ids)
    trained = sum(sum(1 for x in lab if x != -100) for lab in labels)
    return {"rows": len(ids), "tokens": sum(lengths), "trained_tokens": trained, "median_len": lengths[len(lengths) // 2],
            "max_len": lengths[-1], "tokens_path": str(rows_path)}


# -- measuring inside a side's process ------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_in_use() -> Any:
    """A function returning the bytes malloc has handed out and not got back (glibc's mallinfo2), or None.

    Unlike RSS it does not count memory freed but kept by the allocator, which varies from run
    to run with how threads' allocations land in malloc's arenas.
    """
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


class Probe:
    """Counts each consumed micro-batch's real and trained tokens, times steps, samples RSS."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, int]] = []  # counted at collation, in order; consumed by training_step
        self.tokens: list[int] = []
        self.trained: list[int] = []
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []  # process CPU time (all threads) at each step end
        self.losses: list[float] = []
        self.started = 0.0
        self.rss_at_start = 0
        self.rss_peak = 0
        self.step_rss: list[tuple[float, float]] = []  # (RSS when the step began, its peak), GiB
        self.in_use = malloc_in_use()
        self.in_use_peak = 0
        self._step_peak = 0
        self._sampling = False

    def wrap_collator(self, collate: Any) -> Any:
        def counting(rows: list[dict[str, Any]]) -> Any:
            real = sum(len(r["input_ids"]) for r in rows)
            trained = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
            self.pending.append((real, trained))
            return collate(rows)

        return counting

    def wrap_training_step(self, step: Any) -> Any:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            real, trained = self.pending.pop(0)
            self.tokens.append(real)
            self.trained.append(trained)
            return step(*args, **kwargs)

        return training_step

    def callback(self) -> Any:
        from transformers import TrainerCallback

        probe = self

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                probe.start_sampling()

            def on_step_begin(self, args, state, control, **kwargs):
                probe._step_peak = rss_bytes()
                probe.step_rss.append((probe._step_peak / 2**30, 0.0))

            def on_step_end(self, args, state, control, **kwargs):
                probe.step_ends.append(time.perf_counter())
                probe.step_cpu.append(time.process_time())
                if probe.step_rss:
                    probe.step_rss[-1] = (probe.step_rss[-1][0], probe._step_peak / 2**30)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    probe.losses.append(float(logs["loss"]))

            def on_train_end(self, args, state, control, **kwargs):
                probe._sampling = False

        return Timer()

    def start_sampling(self) -> None:
        self.started = time.perf_counter()
        self.rss_at_start = self.rss_peak = rss_bytes()
        self._sampling = True

        def sample() -> None:
            while self._sampling:
                now = rss_bytes()
                self.rss_peak = max(self.rss_peak, now)
                self._step_peak = max(self._step_peak, now)
                if self.in_use is not None:
                    self.in_use_peak = max(self.in_use_peak, self.in_use())
                time.sleep(0.005)

        threading.Thread(target=sample, daemon=True).start()

    def _cpu_timed(self) -> float:
        return self.step_cpu[-1] - self.step_cpu[0] if len(self.step_cpu) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        steps = len(self.step_ends)
        timed_tokens = sum(self.tokens[1:steps])
        timed = self.step_ends[-1] - self.step_ends[0] if steps > 1 else 0.0
        return {
            "steps": steps,
            "tokens": sum(self.tokens),
            "trained_tokens": sum(self.trained),
            "tokens_per_step": self.tokens,
            "train_seconds": round(self.step_ends[-1] - self.started, 3) if steps else None,
            "first_step_seconds": round(self.step_ends[0] - self.started, 3) if steps else None,
            "timed_seconds": round(timed, 3),
            "tokens_per_second": round(timed_tokens / timed, 2) if timed > 0 else None,
            # less sensitive to other processes on the machine than wall time
            "tokens_per_cpu_second": round(timed_tokens / cpu, 2) if (cpu := self._cpu_timed()) > 0 else None,
            "step_seconds": [round(b - a, 4) for a, b in zip([self.started, *self.step_ends[:-1]], self.step_ends, strict=True)],
            "losses": [round(x, 5) for x in self.losses],
            "rss_at_train_start_gb": round(self.rss_at_start / 2**30, 3),
            "train_peak_rss_gb": round(self.rss_peak / 2**30, 3),
            "train_peak_malloc_in_use_gb": round(self.in_use_peak / 2**30, 3) if self.in_use is not None else None,
            "step_rss_gb": [[round(a, 3), round(b, 3)] for a, b in self.step_rss],  # [at step start, step peak]
        }


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def run_ft(spec: dict[str, Any], side: str) -> dict[str, Any]:
    import ft.run
    from ft import hookimpl
    from ft.kernel.plugins import add_process_plugin

    probe = Probe()
    seed = spec["seed"]

    class BenchProbe:
        @hookimpl
        def ft_patch_model(self, cfg, model):
            seed_everything(seed)  # the next step draws the adapter's initial weights
            return []

        @hookimpl
        def ft_callbacks(self, cfg):
            return [probe.callback()]

        @hookimpl
        def ft_before_train(self, cfg, trainer, model):
            trainer.data_collator = probe.wrap_collator(trainer.data_collator)
            trainer.training_step = probe.wrap_training_step(trainer.training_step)

    add_process_plugin("bench_probe", BenchProbe())
    args = ["no:fused_loss"] if side == "ft_baseline" else []
    with contextlib.redirect_stdout(sys.stderr):
        result = ft.run.run(ft_config(spec, side), args, overwrite=True, fresh=True)
    out = probe.summary()
    out["ft_reported"] = {k: result.metrics.get(k) for k in ("train_tokens", "trained_tokens", "tokens_per_second",
                                                            "final_loss")}
    out["patches"] = [str(p) for p in result.patches]
    return out


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(spec["tokens_path"]).read_text().splitlines()]
    train = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    packed = spec["mode"] == "packed"
    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / "runs" / f"trl-{spec['mode']}"),
        per_device_train_batch_size=spec["micro_batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", seed=spec["seed"], data_seed=spec["seed"],
        max_length=spec["sequence_len"], packing=packed, dataset_num_proc=1,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    probe = Probe()
    seed_everything(spec["seed"])  # SFTTrainer draws the adapter's initial weights first thing
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[probe.callback()])
    padding_free = getattr(trainer.data_collator, "padding_free", None)  # packing=True turns it on
    trainer.data_collator = probe.wrap_collator(trainer.data_collator)
    trainer.training_step = probe.wrap_training_step(trainer.training_step)
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
        trainer.save_model()  # the adapter, as ft saves its own at the end of a run
    out = probe.summary()
    out["trl"] = {"loss_type": args.loss_type, "padding_free": padding_free, "optim": str(args.optim)}
    return out


def child(spec_path: str, side: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = run_trl(spec) if side == "trl" else run_ft(spec, side)
    result["threads"] = __import__("torch").get_num_threads()
    Path(spec["result"]).write_text(json.dumps(result))


# -- the comparison ---------------------------------------------------------------------------------


def run_side(spec: dict[str, Any], side: str, timeout: float) -> dict[str, Any]:
    """One side in its own process; its peak RSS from wait4 (its own high-water mark)."""
    spec_path = Path(spec["work"]) / f"spec-{side}-{spec['mode']}.json"
    result_path = Path(spec["work"]) / f"result-{side}-{spec['mode']}.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    log_path = Path(spec["work"]) / f"log-{side}-{spec['mode']}.txt"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", side, "--spec", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = round(time.perf_counter() - started, 1)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        return {"error": f"exit status {proc.returncode}", "log_tail": tail, "process_seconds": wall}
    result = json.loads(result_path.read_text())
    result["peak_rss_gb"] = round(usage.ru_maxrss * 1024 / 2**30, 3)  # ru_maxrss is in KiB on Linux
    result["process_seconds"] = wall
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per mode: ft's median tokens/s and peak RSS against TRL's."""
    checks = {}
    for mode, sides in results.items():
        ft, trl = sides.get("ft", {}).get("median", {}), sides.get("trl", {}).get("median", {})
        if not ft.get("tokens_per_second") or not trl.get("tokens_per_second"):
            continue
        checks[mode] = {
            "tokens_per_second_ratio": round(ft["tokens_per_second"] / trl["tokens_per_second"], 3),
            "tokens_per_cpu_second_ratio": (round(ft["tokens_per_cpu_second"] / trl["tokens_per_cpu_second"], 3)
                                            if ft.get("tokens_per_cpu_second") and trl.get("tokens_per_cpu_second")
                                            else None),
            "peak_rss_ratio": round(ft["peak_rss_gb"] / trl["peak_rss_gb"], 3),
            "ft_at_least_as_fast": ft["tokens_per_second"] >= trl["tokens_per_second"],
            "ft_at_most_as_much_memory": ft["peak_rss_gb"] <= trl["peak_rss_gb"],
        }
    return checks


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs": runs}
    if ok:
        out["median"] = {k: median_of(ok, k) for k in ("tokens_per_second", "tokens_per_cpu_second", "peak_rss_gb",
                                                        "train_peak_rss_gb", "train_peak_malloc_in_use_gb",
                                                        "timed_seconds", "train_seconds")}
        out["median"].update({"tokens": ok[0]["tokens"], "trained_tokens": ok[0]["trained_tokens"],
                              "first_loss": ok[0]["losses"][0] if ok[0]["losses"] else None,
                              "final_loss": ok[0]["losses"][-1] if ok[0]["losses"] else None})
    return out


def versions() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model of ft.tools.tiny, CI-sized (well under a minute)")
    parser.add_argument("--model", help=f"model directory (default {DEFAULT_MODEL}; make it with bench/smollm2.py)")
    parser.add_argument("--data", help="chat JSONL ({'messages': [...]} rows); default: a synthetic multi-turn one")
    parser.add_argument("--modes", default=",".join(MODES), help="padded, packed")
    parser.add_argument("--sides", default="ft,trl", help=f"from: {', '.join(SIDES)}")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 10; tiny 4)")
    parser.add_argument("--repeat", type=int, help="alternations of the sides (default 3; tiny 1)")
    parser.add_argument("--threads", type=int, help="torch threads per side (default: torch's; tiny 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per side run")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.spec, args.child)
        return {}

    modes = [m for m in args.modes.split(",") if m]
    sides = [s for s in args.sides.split(",") if s]
    bad = [x for x in modes if x not in MODES] + [x for x in sides if x not in SIDES]
    if bad:
        parser.error(f"unknown mode(s) or side(s) {bad}; modes: {', '.join(MODES)}; sides: {', '.join(SIDES)}")
    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("WANDB_MODE", "disabled")):
        os.environ.setdefault(key, value)
    repeat = args.repeat or (1 if args.tiny else 3)

    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-vs-trl-")))
        work.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            from ft.tools.tiny import make_tiny

            with contextlib.redirect_stdout(sys.stderr):
                model_dir = make_tiny(work / "tiny-model")
        else:
            model_dir = Path(args.model) if args.model else DEFAULT_MODEL
            if not (model_dir / "config.json").is_file():
                parser.error(f"no model in {model_dir}: run `python bench/smollm2.py` first (or pass --model DIR)")
        spec: dict[str, Any] = {
            "model_dir": str(model_dir), "work": str(work), "seed": 0,
            "data": str(Path(args.data).resolve()) if args.data else str(write_chats(work / "chat.jsonl", 400)),
            "sequence_len": 256 if args.tiny else 512, "micro_batch_size": 8,
            "steps": args.steps or (4 if args.tiny else 10), "learning_rate": 1e-3,
            # tiny models train fastest on one thread (two spin-wait for each other on a busy box)
            "threads": args.threads or (1 if args.tiny else None),
        }
        t0 = time.perf_counter()
        spec.update(prepare(spec))
        report: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: other processes may have run)",
            "versions": versions(),
            "recipe": {**{k: spec[k] for k in ("model_dir", "sequence_len", "micro_batch_size", "steps",
                                               "learning_rate", "seed", "threads")},
                       "lora": LORA, "lr_scheduler": "cosine", "precision": "fp32", "gradient_checkpointing": False,
                       "data": spec["data"], "rows": spec["rows"], "tokens_in_data": spec["tokens"],
                       "trained_tokens_in_data": spec["trained_tokens"], "median_len": spec["median_len"],
                       "max_len": spec["max_len"], "repeat": repeat,
                       "prepare_seconds": round(time.perf_counter() - t0, 1)},
            "results": {},
        }
        runs: dict[str, dict[str, list]] = {m: {s: [] for s in sides} for m in modes}
        for r in range(repeat):
            for mode in modes:
                order = sides if r % 2 == 0 else list(reversed(sides))
                for side in order:
                    result = run_side({**spec, "mode": mode}, side, args.timeout)
                    runs[mode][side].append(result)
                    print(f"[vs_trl] {mode} {side} #{r + 1}: " + ", ".join(
                        f"{k}={result.get(k)}" for k in ("tokens_per_second", "peak_rss_gb", "tokens", "error")
                        if k in result), file=sys.stderr)
        report["results"] = {m: {s: summarize(runs[m][s]) for s in sides} for m in modes}
        report["checks"] = compare(report["results"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
