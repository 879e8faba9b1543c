"""Training throughput: `ft run` against a plain transformers + PyTorch loop, same model and data.

    python bench/train.py --device cpu --tiny               # CI-sized: tiny Llama, a few steps
    python bench/train.py --device cuda                     # Llama-3.2-1B shape, 20 steps per config
    python bench/train.py --device cuda --configs plain_full,ft_full --out result.json

The model is randomly initialised (no download): on CUDA the Llama-3.2-1B shape (vocab 128256,
hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, tied embeddings), bf16,
sequence_len 2048 and 4 x 2048 = 8192 tokens per optimizer step; on CPU the tiny model of
``ft.tools.tiny`` in fp32, sequence_len 256. The data are SFT-like samples with lognormal lengths
(median 450 tokens on CUDA, 48 on CPU) whose first ~30% is an untrained prompt, made of
learnable token sequences (a fixed successor table mixed with Zipf noise) so the loss moves.

Every configuration trains ``--steps`` optimizer steps with the same seed, constant learning
rate, AdamW, gradient clipping 1.0. The first ``--warmup`` steps (compilation, allocator
warm-up) are not timed. ft configurations run in this process through ``ft.run.run`` with a
process plugin that registers the data format, counts the real tokens each micro-batch holds
(packed bins carry no padding) and times the steps; the plain loop times itself the same way.

Printed JSON (also written to ``--out``): per configuration real tokens/s, MFU
(6 x parameters x real tokens/s / 989e12, the full-fine-tuning formula for every config, for
comparison only), peak memory in GiB (CUDA: ``max_memory_allocated`` since the configuration
started; CPU: sampled process RSS, which never shrinks, so later CPU configurations inherit the
earlier ones' high-water mark), and the loss of the last step and the mean of the last five.
``comparisons`` gives each ft configuration's speed and loss against the plain loop of its kind
(full or LoRA), and on CUDA ``targets`` checks the figures of issue 9. A configuration that cannot run here (Liger on a
CPU) is reported with the one-sentence reason ft gave.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft import hookimpl
from ft.api import IGNORE_INDEX

PEAK_FLOPS = 989e12  # H100 SXM dense bf16, the denominator of MFU in issue 9


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration."""

    name: str
    kind: str  # "plain" or "ft"
    what: str
    plugins: tuple[str, ...] = ()
    lora: bool = False
    padded: bool = False  # plain loop only: batches of whole sequences, right-padded


SPECS = {s.name: s for s in (
    Spec("plain_full", "plain", "transformers + PyTorch loop, full FT, packed WITHOUT masking (sequences "
         "attend across boundaries), SDPA"),
    Spec("plain_full_padded", "plain", "transformers + PyTorch loop, full FT, batches of 4 whole sequences "
         "right-padded, SDPA", padded=True),
    Spec("plain_lora", "plain", "transformers + PyTorch loop, LoRA r=16 all-linear, packed without masking, SDPA",
         lora=True),
    Spec("ft_full_mask", "ft", "ft run -p packing: exact packing with a block-diagonal mask, SDPA",
         ("packing",)),
    Spec("ft_full", "ft", "ft run -p packing -p varlen: exact packing, varlen attention", ("packing", "varlen")),
    Spec("ft_full_liger", "ft", "ft run -p packing -p varlen -p liger", ("packing", "varlen", "liger")),
    Spec("ft_full_compile", "ft", "ft run -p packing -p varlen -p compile", ("packing", "varlen", "compile")),
    Spec("ft_lora", "ft", "ft run -p packing -p varlen -p lora (r=16 all-linear)", ("packing", "varlen", "lora"),
         lora=True),
    Spec("ft_lora_liger", "ft", "ft run -p packing -p varlen -p liger -p lora (r=16 all-linear)",
         ("packing", "varlen", "liger", "lora"), lora=True),
)}

# At most six on the GPU so the whole run fits one device call.
DEFAULT_CONFIGS = {
    "cuda": ["plain_full", "ft_full", "plain_lora", "ft_lora_liger", "ft_full_liger", "ft_full_compile"],
    "cpu": ["plain_full", "plain_lora", "ft_full_mask", "ft_full", "ft_full_liger", "ft_full_compile", "ft_lora",
            "ft_lora_liger"],
}

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=True)
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


@dataclass
class Setup:
    device: str
    tiny: bool
    work: Path
    steps: int
    warmup: int
    sequence_len: int
    micro_batch_size: int
    learning_rate: float
    seed: int
    model_dir: Path = Path()
    data_path: Path = Path()
    rows: list[dict[str, Any]] = field(default_factory=list)
    params: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.sequence_len * self.micro_batch_size


# -- model and data ----------------------------------------------------------------------------


def make_model(setup: Setup) -> None:
    """A random-weight model + the tiny tokenizer in ``setup.model_dir`` (nothing is downloaded)."""
    import torch

    from ft.tools.tiny import make_model as make_tiny_model
    from ft.tools.tiny import make_tokenizer

    out = setup.work / "model"
    tokenizer = make_tokenizer(out)
    if setup.tiny:
        model = make_tiny_model(out, tokenizer=tokenizer, max_positions=max(2048, setup.sequence_len), seed=setup.seed)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**LLAMA_1B, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             bos_token_id=None, pad_token_id=None)
        torch.manual_seed(setup.seed)
        with torch.device(setup.device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
    setup.params = sum(p.numel() for p in model.parameters())
    setup.model_dir = out
    del model
    _free()


def make_rows(setup: Setup, vocab_size: int) -> list[dict[str, Any]]:
    """SFT-like samples: lognormal lengths, a prompt of ~30% (not trained), learnable token sequences."""
    import numpy as np

    rng = np.random.default_rng(setup.seed)
    median = 48 if setup.tiny else 450
    span = min(vocab_size, 4096)  # tokens used: a Zipf head of the vocabulary
    successor = rng.permutation(span)
    zipf = 1.0 / np.arange(1, span + 1)
    zipf /= zipf.sum()
    need = int(setup.steps * setup.tokens_per_step * 1.5) + 4 * setup.sequence_len
    rows, total = [], 0
    while total < need:
        n = int(np.clip(rng.lognormal(math.log(median), 0.6), 8, setup.sequence_len))
        noise = rng.choice(span, size=n, p=zipf)
        follow = rng.random(n) < 0.6
        ids = np.empty(n, dtype=np.int64)
        ids[0] = noise[0]
        for i in range(1, n):
            ids[i] = successor[ids[i - 1]] if follow[i] else noise[i]
        prompt = max(1, int(n * rng.uniform(0.2, 0.4)))
        rows.append({"input_ids": ids.tolist(), "prompt_len": prompt})
        total += n
    return rows


def write_rows(setup: Setup) -> None:
    import json as _json

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(setup.model_dir).vocab_size
    setup.rows = make_rows(setup, vocab)
    setup.data_path = setup.work / "data.jsonl"
    with setup.data_path.open("w") as fh:
        for row in setup.rows:
            fh.write(_json.dumps(row) + "\n")


def labels_of(row: dict[str, Any]) -> list[int]:
    ids, k = row["input_ids"], row["prompt_len"]
    return [IGNORE_INDEX] * k + list(ids[k:])


# -- measuring -----------------------------------------------------------------------------------


class Meter:
    """Step end times, per-micro-batch real tokens, losses, and peak memory of one configuration."""

    def __init__(self, device: str):
        self.device = device
        self.step_ends: list[float] = []
        self.batch_tokens: list[int] = []
        self.losses: list[float] = []
        self.start = time.perf_counter()
        self._rss_peak = 0
        self._stop = threading.Event()
        self._thread = None
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample_rss, daemon=True)
            self._thread.start()

    def _sample_rss(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
                self._rss_peak = max(self._rss_peak, rss)
            self._stop.wait(0.02)

    def step_end(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def close(self) -> None:
        """Stop the RSS sampler (CPU)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def peak_gib(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**30
        self.close()
        return self._rss_peak / 2**30

    def summary(self, setup: Setup, micro_batches_per_step: int = 1) -> dict[str, Any]:
        peak = self.peak_gib()
        steps = len(self.step_ends)
        if steps <= setup.warmup:
            raise RuntimeError(f"only {steps} steps ran; need more than --warmup {setup.warmup}")
        seconds = self.step_ends[-1] - self.step_ends[setup.warmup - 1] if setup.warmup else self.step_ends[-1] - self.start
        first, last = setup.warmup * micro_batches_per_step, steps * micro_batches_per_step
        tokens = sum(self.batch_tokens[first:last])
        tps = tokens / seconds
        tail = self.losses[-5:]
        return {
            "tokens_per_second": round(tps, 1),
            "mfu": float(f"{6 * setup.params * tps / PEAK_FLOPS:.4g}"),
            "peak_gib": round(peak, 2),
            "loss_last": round(self.losses[-1], 4) if self.losses else None,
            "loss_mean_last5": round(sum(tail) / len(tail), 4) if tail else None,
            "losses": [round(x, 4) for x in self.losses],
            "timed_steps": steps - setup.warmup,
            "timed_tokens": tokens,
            "timed_seconds": round(seconds, 3),
        }


# -- the plain loop ------------------------------------------------------------------------------


def plain_batches(setup: Setup, padded: bool):
    """Packed without masking: one token stream cut into (micro_batch, sequence_len) blocks;
    padded: micro_batch whole samples per batch, right-padded, with an attention mask."""
    import torch

    order = list(range(len(setup.rows)))
    random.Random(setup.seed).shuffle(order)
    rows = [setup.rows[i] for i in order]
    mb, length = setup.micro_batch_size, setup.sequence_len
    while True:
        if padded:
            for i in range(0, len(rows) - mb + 1, mb):
                chunk = rows[i:i + mb]
                longest = max(len(r["input_ids"]) for r in chunk)
                ids = torch.zeros(mb, longest, dtype=torch.long)
                labels = torch.full((mb, longest), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros(mb, longest, dtype=torch.long)
                for j, r in enumerate(chunk):
                    n = len(r["input_ids"])
                    ids[j, :n] = torch.tensor(r["input_ids"])
                    labels[j, :n] = torch.tensor(labels_of(r))
                    mask[j, :n] = 1
                yield ids, labels, mask, int(mask.sum())
        else:
            stream_ids = [t for r in rows for t in r["input_ids"]]
            stream_labels = [t for r in rows for t in labels_of(r)]
            block = mb * length
            for i in range(0, len(stream_ids) - block + 1, block):
                ids = torch.tensor(stream_ids[i:i + block]).view(mb, length)
                labels = torch.tensor(stream_labels[i:i + block]).view(mb, length)
                yield ids, labels, None, block


def run_plain(spec: Spec, setup: Setup) -> dict[str, Any]:
    meter = Meter(setup.device)
    try:
        return _train_plain(spec, setup, meter)
    finally:
        meter.close()


def _train_plain(spec: Spec, setup: Setup, meter: Meter) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if setup.device == "cuda" else torch.float32
    torch.manual_seed(setup.seed)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.to(setup.device).train()
    if spec.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=setup.learning_rate, weight_decay=0.0)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if setup.device == "cuda"
                else contextlib.nullcontext())
    batches = plain_batches(setup, spec.padded)
    for _ in range(setup.steps):
        ids, labels, mask, real = next(batches)
        ids, labels = ids.to(setup.device), labels.to(setup.device)
        mask = mask.to(setup.device) if mask is not None else None
        meter.batch_tokens.append(real)
        with autocast:
            loss = model(input_ids=ids, labels=labels, attention_mask=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.losses.append(float(loss.item()))
        meter.step_end()
    return meter.summary(setup)


# -- ft ----------------------------------------------------------------------------------------


class BenchProbe:
    """A process plugin for the ft runs: the ``bench_tokens`` format, token counting, step timing."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.meter: Meter | None = None

    @hookimpl
    def ft_register_formats(self, register):
        from ft.kernel.formats import DatasetOptions

        class BenchTokens(DatasetOptions):
            """Rows of ``input_ids`` with a ``prompt_len`` that is not trained."""

        register.add("bench_tokens", BenchTokens, lambda cfg, entry, tokenizer: tokenize_rows)

    @hookimpl
    def ft_callbacks(self, cfg):
        from transformers import TrainerCallback

        probe = self

        class StepTimer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                probe.meter.step_end()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    probe.meter.losses.append(float(logs["loss"]))

        return [StepTimer()]

    @hookimpl
    def ft_before_train(self, cfg, trainer, model):
        collate = trainer.data_collator
        meter = self.meter

        def counting(rows):
            meter.batch_tokens.append(sum(len(r["input_ids"]) for r in rows))
            return collate(rows)

        trainer.data_collator = counting


def tokenize_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"input_ids": list(r["input_ids"]), "labels": labels_of(r)} for r in rows]


def ft_config(spec: Spec, setup: Setup) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base_model": str(setup.model_dir),
        "datasets": [{"path": str(setup.data_path), "type": "bench_tokens"}],
        "plugins": list(spec.plugins),
        "sequence_len": setup.sequence_len,
        "micro_batch_size": setup.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": setup.steps,
        "learning_rate": setup.learning_rate,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optimizer": "adamw_torch",
        "bf16": setup.device == "cuda",
        "logging_steps": 1,
        "seed": setup.seed,
        "dataset_num_proc": 1,
        "dataset_prepared_path": str(setup.work / "prepared"),
        "output_dir": str(setup.work / "runs" / spec.name),
    }
    if spec.lora:
        cfg["lora"] = dict(LORA)
    if "compile" in spec.plugins:
        cfg["compile"] = {"dynamic": True}  # packed batches vary in length: one dynamic graph, no recompiles
    return cfg


def run_ft(spec: Spec, setup: Setup) -> dict[str, Any]:
    import shutil

    import ft.run
    from ft.kernel.errors import FtError
    from ft.kernel.plugins import add_process_plugin, remove_process_plugin

    probe = BenchProbe(setup)
    out = setup.work / "runs" / spec.name
    shutil.rmtree(out, ignore_errors=True)
    add_process_plugin("bench_probe", probe)
    try:
        probe.meter = Meter(setup.device)
        with contextlib.redirect_stdout(sys.stderr):  # ft's run summary; stdout is for the JSON
            result = ft.run.run(ft_config(spec, setup))
    except FtError as exc:
        probe.meter.close()
        return {"skipped": str(exc)}
    except BaseException:
        probe.meter.close()
        raise
    finally:
        remove_process_plugin("bench_probe")
        shutil.rmtree(out, ignore_errors=True)  # full-FT weights are large; the figures are what we keep
    summary = probe.meter.summary(setup)
    summary["patches"] = [str(p) for p in result.patches]
    summary["ft_tokens_per_second"] = result.metrics.get("tokens_per_second")  # ft's own, incl. warm-up steps
    return summary


# -- the whole benchmark ---------------------------------------------------------------------------


def _free() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_config(spec: Spec, setup: Setup) -> dict[str, Any]:
    import traceback

    started = time.perf_counter()
    try:
        result = run_plain(spec, setup) if spec.kind == "plain" else run_ft(spec, setup)
    except Exception as exc:  # one broken configuration must not cost the others' figures
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    finally:
        _free()
        if "compile" in spec.plugins:
            with contextlib.suppress(Exception):
                import torch

                torch._dynamo.reset()
    result = {"what": spec.what, **result, "wall_seconds": round(time.perf_counter() - started, 1)}
    print(f"[bench] {spec.name}: " + ", ".join(f"{k}={result[k]}" for k in (
        "tokens_per_second", "peak_gib", "loss_mean_last5", "skipped", "error") if k in result), file=sys.stderr)
    return result


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """Each ft configuration against the plain packed loop of its kind (speed, memory, loss), and
    each ft variant against plain ft packing + varlen of its kind (what Liger / compile change)."""
    out = {}
    for name, r in results.items():
        spec = SPECS[name]
        if spec.kind != "ft":
            continue
        kind = "lora" if spec.lora else "full"
        for base_name in (f"plain_{kind}", f"ft_{kind}"):
            base = results.get(base_name)
            if base_name == name or not base or "tokens_per_second" not in r or "tokens_per_second" not in base:
                continue
            loss, base_loss = r.get("loss_mean_last5"), base.get("loss_mean_last5")
            out[f"{name}_vs_{base_name}"] = {
                "speedup": round(r["tokens_per_second"] / base["tokens_per_second"], 3),
                "peak_ratio": round(r["peak_gib"] / base["peak_gib"], 3) if base["peak_gib"] else None,
                "loss_rel_diff": (round(abs(loss - base_loss) / abs(base_loss), 5)
                                  if loss is not None and base_loss else None),
            }
    return out


def targets(results: dict[str, Any], comparisons: dict[str, Any]) -> dict[str, Any]:
    """Issue 9's targets, on the figures of this run (meaningful on the H100 only)."""
    def best(names, key="tokens_per_second"):
        found = [(results[n][key], n) for n in names if n in results and key in results[n]]
        return max(found) if found else (None, None)

    full_tps, full_name = best([n for n, s in SPECS.items() if s.kind == "ft" and not s.lora])
    lora_tps, lora_name = best([n for n, s in SPECS.items() if s.kind == "ft" and s.lora])
    out: dict[str, Any] = {}
    if full_tps is not None:
        out["full_ft_tokens_per_second>=50000"] = {"config": full_name, "value": full_tps, "met": full_tps >= 50000}
    if lora_tps is not None:
        out["lora_tokens_per_second>=55000"] = {"config": lora_name, "value": lora_tps, "met": lora_tps >= 55000}
        ratio = comparisons.get(f"{lora_name}_vs_plain_lora", {}).get("peak_ratio")
        if ratio is not None:
            out["lora_peak<=0.6x_plain_lora"] = {"config": lora_name, "value": ratio, "met": ratio <= 0.6}
    diffs = {k: v["loss_rel_diff"] for k, v in comparisons.items()
             if "_vs_plain_" in k and v.get("loss_rel_diff") is not None}
    if diffs:
        worst = max(diffs.values())
        out["loss_rel_diff<2e-2"] = {"value": worst, "per_config": diffs, "met": worst < 2e-2}
    return out


def versions() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for dist in ("torch", "transformers", "peft", "accelerate", "liger-kernel", "flash-attn", "triton"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (always on CPU)")
    parser.add_argument("--steps", type=int, help="optimizer steps per configuration (cuda 20, cpu 6)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (cuda 3, cpu 2)")
    parser.add_argument("--configs", help=f"comma-separated, from: {', '.join(SPECS)}")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU here")
    tiny = args.tiny or args.device == "cpu"
    names = args.configs.split(",") if args.configs else DEFAULT_CONFIGS[args.device]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(SPECS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        setup = Setup(
            device=args.device, tiny=tiny, work=work,
            steps=args.steps or (20 if args.device == "cuda" else 6),
            warmup=args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 2),
            sequence_len=256 if tiny else 2048, micro_batch_size=4,
            learning_rate=1e-4 if not tiny else 1e-3, seed=0,
        )
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            make_model(setup)
            write_rows(setup)
        lengths = sorted(len(r["input_ids"]) for r in setup.rows)
        report: dict[str, Any] = {
            "device": device_name(args.device),
            "versions": versions(),
            "setup": {
                "model": "tiny Llama (ft.tools.tiny)" if tiny else "Llama-3.2-1B shape, random init",
                "parameters": setup.params, "dtype": "bf16" if args.device == "cuda" else "fp32",
                "sequence_len": setup.sequence_len, "micro_batch_size": setup.micro_batch_size,
                "tokens_per_step": setup.tokens_per_step, "steps": setup.steps, "warmup_steps": setup.warmup,
                "learning_rate": setup.learning_rate, "samples": len(lengths),
                "median_len": lengths[len(lengths) // 2], "mean_len": round(sum(lengths) / len(lengths), 1),
                "setup_seconds": round(time.perf_counter() - t0, 1),
            },
            "mfu_definition": "6 x parameters x real tokens/s / 989e12 (full-FT formula for every config)",
            "results": {},
        }
        for name in names:
            report["results"][name] = run_config(SPECS[name], setup)
            if args.out:  # what is done so far survives a run cut short
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        report["comparisons"] = compare(report["results"])
        if args.device == "cuda" and not tiny:
            report["targets"] = targets(report["results"], report["comparisons"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
