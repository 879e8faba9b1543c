"""The GRPO Trainer: generate, score, compute advantages, then the clipped-surrogate loss (see the package
docstring). Importing this module imports torch and transformers; the plugin imports it when training."""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from ft_plugins.grpo.batches import pack_rows, pad_floats, step_shape
from ft_plugins.grpo.config import GRPOOptions, options
from ft_plugins.grpo.generation import HFGeneration
from ft_plugins.grpo.losses import (
    combine_rewards,
    forward_completion_logps,
    group_advantages,
    is_weights,
    masked_mean,
    nanstd,
    policy_loss,
)
from ft_plugins.grpo.reward_calls import RewardFunction, build_rewards, describe_reward, score, shorten
from transformers import Trainer

from ft.api import FtError, ReferenceModel, accumulation_share

log = logging.getLogger("ft.grpo")

COMPLETIONS_FILE = "completions.jsonl"
NO_SIGNAL_STEPS = 5  # generations in a row without any reward difference inside a group: warn


def trainer_kwargs(cfg: Any, model: Any, tokenizer: Any, data: Any) -> dict[str, Any]:
    opts = options(cfg)
    reference = ReferenceModel.for_training(model, "grpo") if opts.beta > 0 else None
    if reference is None:
        log.info("grpo: beta is 0, so no reference model is loaded (no KL term)")
    return {"grpo": opts, "rewards": build_rewards(cfg, opts), "reference": reference, "ft_cfg": cfg}



class StepSampler(torch.utils.data.Sampler):
    """Prompt indices in the order GRPO consumes them.

    Each optimizer step needs ``per_rank`` prompts on each of ``world`` devices. The dataloader hands every
    micro-batch the prompts of its device's whole step (batch size ``per_rank``), ``repeats`` times in a row
    (accumulation steps x num_iterations), and the distributed sampler deals batches to devices round-robin, so
    the stream is: for each step, ``repeats`` times, each device's part in device order. The order of prompts
    is shuffled per epoch with the seed (``set_epoch``), so a resumed run sees the same prompts.
    """

    def __init__(self, size: int, per_rank: int, world: int, repeats: int, seed: int, shuffle: bool):
        self.size, self.per_rank, self.world, self.repeats = size, per_rank, world, repeats
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> int:
        return self.size // (self.per_rank * self.world)

    def __len__(self) -> int:
        return self.steps() * self.per_rank * self.world * self.repeats

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.size, generator=generator).tolist()
        return list(range(self.size))

    def step_indices(self, step: int, rank: int = 0) -> list[int]:
        """The prompts of the ``step``-th generation of the run (counted over epochs) on device ``rank``."""
        epoch, s = divmod(step, self.steps())
        start = s * self.per_rank * self.world + rank * self.per_rank
        return self.order(epoch)[start:start + self.per_rank]

    def __iter__(self):
        order = self.order(self.epoch)
        width = self.per_rank * self.world
        for s in range(self.steps()):
            chunk = order[s * width:(s + 1) * width]
            for _ in range(self.repeats):
                yield from chunk


class GRPOTrainer(Trainer):
    """Generate, score, compute advantages, then the clipped-surrogate loss (see the package docstring)."""

    # compute_loss returns a micro-batch's share of the step (dapo: over accumulation_share's tokens); the
    # Trainer divides it by the accumulation steps, as TRL's does
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, grpo: GRPOOptions, rewards: list[RewardFunction], reference: Any = None,
                 ft_cfg: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grpo, self.rewards, self.reference, self.ft_cfg = grpo, rewards, reference, ft_cfg
        if grpo.disable_dropout:  # old log-probs (IS weights, ratios) must not differ from the sampler's by a mask
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = getattr(self.model.generation_config, "eos_token_id", None) if hasattr(self.model, "generation_config") else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tok.eos_token_id is not None:
            eos.append(tok.eos_token_id)
        if not eos:
            raise FtError("the tokenizer has no eos_token, so completions could not end; set special_tokens: "
                          "{eos_token: ...}.")
        self.eos_token_ids = frozenset(eos)
        self.generation = HFGeneration(self)
        self._synced_step = -1
        self._pending: list[tuple[list[list[int]], Any]] = []  # async: (prompt ids, future), oldest first
        self._executor: Any = None
        self._step_sampler: Any = None
        self.async_misses = 0  # async generations whose prompts were not the step's (generated again)
        self._buffer: list[dict[str, Any]] | None = None
        self._micro = 0
        self._flat_steps = 0
        self._log_ready = False
        self._said_none: set[str] = set()
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        if self.reference is not None:
            self.reference.to(self.args.device)
        log_every = grpo.log_completions_steps
        self._log_every = self.args.logging_steps if log_every is None else log_every

    # the generation backend (the vllm plugin replaces it in ft_before_train)

    def set_generation(self, generation: Any) -> None:
        """Use ``generation`` (``generate(prompt_ids, n, sampling) -> completion ids``, ``sync_weights(model)``,
        ``name``) instead of Hugging Face generate on the training model."""
        self.generation = generation
        self._synced_step = -1

    # data: each micro-batch carries the prompts of its device's whole step

    def get_train_dataloader(self):
        per_rank, _ = step_shape(self.ft_cfg, self.args.world_size)
        saved = self._train_batch_size
        self._train_batch_size = per_rank
        try:
            return super().get_train_dataloader()
        finally:
            self._train_batch_size = saved

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        per_rank, _ = step_shape(self.ft_cfg, self.args.world_size)
        world = self.args.world_size
        repeats = self.args.gradient_accumulation_steps * self.grpo.num_iterations
        if len(dataset) < per_rank * world:
            raise FtError(f"the dataset has {len(dataset)} prompts, fewer than one optimizer step takes "
                          f"({per_rank} per device x {world} device(s): micro_batch_size x gradient_accumulation_steps "
                          f"/ num_generations); add prompts or lower micro_batch_size.")
        self._step_sampler = StepSampler(len(dataset), per_rank, world, repeats, self.args.seed,
                                              bool(self.ft_cfg.shuffle))
        return self._step_sampler

    # one micro-batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()  # as the Trainer does, but before generating: metrics are recorded as training ones
        accumulation = self.args.gradient_accumulation_steps
        k = self._micro % accumulation
        fresh = k == 0 and self.state.global_step % self.grpo.num_iterations == 0
        if self._buffer is None or fresh:
            if k != 0:  # pragma: no cover - a session always starts at an optimizer-step boundary
                raise FtError("grpo: lost its place in the gradient-accumulation window; resume from a checkpoint.")
            self._buffer = self._generate_step(inputs["prompts"].rows)
        batch = self._buffer[k]
        self._micro += 1
        state = getattr(self, "ft_state", None)
        if state is not None:  # count what is trained: the prompt and completion tokens of this micro-batch
            state.counter.add({"attention_mask": batch["attention_mask"], "labels": batch["labels"]})
        return super().training_step(model, {k_: v for k_, v in batch.items() if k_ != "labels"},
                                     num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        opts = self.grpo
        logps, entropy = self._logps(model, inputs, entropy=True)
        mask = inputs["completion_mask"]
        loss, stats = policy_loss(
            logps, inputs.get("old_logps"), inputs.get("ref_logps"), inputs["advantages"], mask,
            loss_type=opts.loss_type, epsilon_low=opts.epsilon,
            epsilon_high=opts.epsilon_high if opts.epsilon_high is not None else opts.epsilon, beta=opts.beta,
            max_completion_len=opts.max_completion_len, step_tokens=inputs["step_tokens"],
            importance=inputs.get("importance"))
        record = {"entropy": masked_mean(entropy, mask), "clip_ratio": masked_mean(stats["clip_ratio"], mask)}
        if "kl" in stats:
            record["kl"] = masked_mean(stats["kl"], mask)
        self._record(record)
        return (loss, None) if return_outputs else loss

    def _logps(self, model, batch, entropy=False):
        """Log-probabilities of the batch's completion tokens under ``model`` (the policy or the reference)."""
        return forward_completion_logps(model, batch, self.grpo.temperature, logits_to_keep=self._logits_to_keep,
                                        entropy=entropy)

    def _record(self, values: dict[str, Any]) -> None:
        record = getattr(self, "ft_record", None)
        if record is not None:
            record(values)

    # one optimizer step's completions: generate, score, advantages, micro-batches

    def _sampling(self) -> dict[str, Any]:
        opts = self.grpo
        sampling = {"temperature": opts.temperature, "top_p": opts.top_p, "top_k": opts.top_k,
                    "max_tokens": opts.max_completion_len}
        if opts.min_p is not None:
            sampling["min_p"] = opts.min_p
        if opts.repetition_penalty != 1.0:
            sampling["repetition_penalty"] = opts.repetition_penalty
        if opts.stop:
            sampling["stop"] = list(opts.stop)
        if opts.stop_token_ids:
            sampling["stop_token_ids"] = list(opts.stop_token_ids)
        return sampling

    def _generate(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], Any]:
        """``(completion ids, the generator's per-token log-probabilities or None)``."""
        g = self.grpo.num_generations
        out = self.generation.generate(prompt_ids, g, self._sampling())
        completion_ids, logps = out if isinstance(out, tuple) else (out, None)
        if len(completion_ids) != len(prompt_ids) * g:
            raise FtError(f"generation ({self.generation.name}) returned {len(completion_ids)} completions for "
                          f"{len(prompt_ids)} prompts x {g}.")
        return completion_ids, logps

    def _sync_now(self) -> None:
        if self.state.global_step != self._synced_step:  # the generator gets the weights of this step
            metrics = self.generation.sync_weights(self.model)
            self._synced_step = self.state.global_step
            if metrics:
                self._record(metrics)

    def _async_lag(self) -> int:
        if not (self.grpo.async_generation and self.grpo.max_lag):
            return 0
        if not getattr(self.generation, "supports_async", False):
            raise FtError(f"grpo.async_generation needs a generator apart from the training model; "
                          f"{self.generation.name} generation is the training model itself. Add -p vllm.")
        if self.args.world_size > 1 and not getattr(self.generation, "per_process", False):
            raise FtError(f"grpo.async_generation with {self.args.world_size} processes needs a generator of each "
                          f"process's own ({self.generation.name} is shared by them, and a generation started ahead "
                          "could get another step's weights): use vllm.mode: colocate, or set async_generation: "
                          "false.")
        return self.grpo.max_lag

    def _completions(self, rows: list[dict[str, Any]]) -> tuple[list[list[int]], Any]:
        """This step's completions: generated now, or (async_generation) by the generation started up to
        max_lag steps ago with the weights of then; then the generations of the next steps are started."""
        prompt_ids = [list(r["input_ids"]) for r in rows]
        lag = self._async_lag()
        if not lag:
            self._sync_now()
            return self._generate(prompt_ids)
        result = None
        if self._pending and self._pending[0][0] == prompt_ids:
            completion_ids, logps, metrics = self._pending.pop(0)[1].result()
            if metrics:
                self._record(metrics)
            result = (completion_ids, logps)
        else:
            if self._pending:  # not the prompts expected (a resumed run, the end of the data): start again
                self.async_misses += 1
                log.debug("grpo: the generation started ahead was for other prompts; generating these now")
            for _, future in self._pending:
                future.result()
            self._pending.clear()
            self._sync_now()
            result = self._generate(prompt_ids)
        self._start_ahead(lag)
        return result

    def _start_ahead(self, lag: int) -> None:
        import concurrent.futures

        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ft-grpo-generate")
        while len(self._pending) < lag:
            prompt_ids = self._prompts_ahead(len(self._pending) + 1)
            if prompt_ids is None:
                return
            apply = None
            if self.state.global_step != self._synced_step:  # written now, while the weights are this step's
                apply = self.generation.snapshot(self.model)
                self._synced_step = self.state.global_step

            def work(apply=apply, prompt_ids=prompt_ids):
                metrics = apply() if apply is not None else None
                return (*self._generate(prompt_ids), metrics)

            self._pending.append((prompt_ids, self._executor.submit(work)))

    def _prompts_ahead(self, ahead: int) -> list[list[int]] | None:
        """The prompt ids of the generation ``ahead`` steps after this one, from the sampler's order (None past
        the end of training)."""
        sampler, iterations = self._step_sampler, self.grpo.num_iterations
        if sampler is None:
            return None
        index = self.state.global_step // iterations + ahead
        total = self.state.max_steps if self.state.max_steps > 0 else math.inf
        if index * iterations >= total:
            return None
        # each process keeps its own pending generations, for the prompts it will get at that step
        return [list(self.train_dataset[i]["input_ids"])
                for i in sampler.step_indices(index, self.args.process_index)]

    def close_generation(self) -> None:
        """Wait for generations still running, stop the generation thread, let the backend clean up."""
        if self.async_misses:
            log.warning("grpo: process %d: %d generation(s) started ahead were for other prompts than their step's "
                        "and were generated again (a resumed run, the end of the data)", self.args.process_index,
                        self.async_misses)
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        close = getattr(self.generation, "close", None)
        if close is not None:
            close()

    def _generate_step(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        opts, device = self.grpo, self.args.device
        g = opts.num_generations
        prompt_ids = [list(r["input_ids"]) for r in rows]
        completion_ids, sampling_logps = self._completions(rows)
        completion_ids = [list(c) if len(c) else [self.pad_token_id] for c in completion_ids]
        expanded = [r for r in rows for _ in range(g)]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [r["prompt"] for r in expanded]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts, strict=True)]
        columns = {c: [r.get(c) for r in expanded] for c in rows[0] if c not in ("input_ids", "prompt")}

        check_stop = getattr(self, "ft_check_stop", None)
        if check_stop is not None:
            check_stop(f"generating completions ({self.generation.name})")
        values, unset = score(self.rewards, prompts, completions, completion_ids, columns,
                              timeout=opts.reward_timeout, check_stop=check_stop)
        for j, reward in enumerate(self.rewards):
            if all(unset[j]) and reward.name not in self._said_none:  # None is allowed: it does not apply
                self._said_none.add(reward.name)
                log.warning("grpo: %s returned None for every completion of step %d (it applies to none of "
                            "them; the other rewards scored them)", describe_reward(reward),
                            self.state.global_step + 1)
        unscored = [k for k in range(len(prompts)) if all(none[k] for none in unset)]
        if unscored and "" not in self._said_none:  # as TRL: said once, the completion is left out
            self._said_none.add("")
            log.warning("grpo: every reward returned None for %d completion(s) of step %d, e.g. for prompt %s; "
                        "they are left out of their group (advantage 0). Make at least one reward score them.",
                        len(unscored), self.state.global_step + 1, shorten(repr(prompts[unscored[0]]), 200))
        per_func = torch.tensor(values, dtype=torch.float32, device=device).T
        none = torch.tensor(unset, dtype=torch.bool, device=device).T
        rewards, bad = combine_rewards(per_func, none, [r.weight for r in self.rewards])
        batch_std = None
        if opts.scale_rewards == "batch":
            batch_std = nanstd(self.accelerator.gather(rewards))  # over every device's completions
        advantages, std = group_advantages(rewards, g, opts.scale_rewards, batch_std)
        if bad.any():
            advantages[bad.any(1)] = math.nan  # the loss is NaN: the health policy (stop/skip/warn) decides
            self._report_nonfinite(bad, per_func, prompts, completions)

        lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float32, device=device)
        # cut at max_completion_len (a completion that ended earlier met an end token or a stop)
        cut = [len(c) >= opts.max_completion_len and c[-1] not in self.eos_token_ids | set(opts.stop_token_ids)
               for c in completion_ids]
        truncated = torch.tensor(cut, dtype=torch.float32, device=device)
        metrics = {"reward": torch.nanmean(rewards), "reward_std": nanstd(rewards),
                   "completion_length": lengths.mean(), "completion_truncated": truncated.mean(),
                   "frac_reward_zero_std": (std.view(-1, g)[:, 0] < 1e-8).float().mean()}
        for j, reward in enumerate(self.rewards):
            column = torch.where(none[:, j], math.nan, per_func[:, j])
            metrics[f"reward/{reward.name}/mean"] = torch.nanmean(column)
            metrics[f"reward/{reward.name}/std"] = nanstd(column)
        self._record(metrics)
        self._watch_signal(bool((std < 1e-8).all()))
        self._log_completions(prompts, texts, values, rewards, advantages)
        if sampling_logps is not None:  # empty completions were given one pad token above
            sampling_logps = [list(lp) if len(lp) else [math.nan] for lp in sampling_logps]
        return self._micro_batches(prompt_ids, completion_ids, advantages, sampling_logps,
                                   cut if opts.mask_truncated_completions else None)

    def _micro_batches(self, prompt_ids, completion_ids, advantages, sampling_logps=None, masked=None):
        """Split the step's completions into micro-batches (each padded to its own longest row) and compute
        what the loss compares against: the generating policy's log-probabilities (num_iterations > 1) and
        the reference's (beta > 0)."""
        opts, device, size = self.grpo, self.args.device, self.args.per_device_train_batch_size
        g = opts.num_generations
        # masked (mask_truncated_completions): completions cut at max_completion_len count no tokens in the loss
        masked = masked or [False] * len(completion_ids)
        tokens = float(sum(len(c) for c, m in zip(completion_ids, masked, strict=True) if not m))
        # dapo: the step's tokens per device, per micro-batch share (see policy_loss); the step's completions
        # were generated for all of its micro-batches
        step_tokens = accumulation_share(self, tokens, self.args.gradient_accumulation_steps)
        out = []
        for start in range(0, len(completion_ids), size):
            rows = range(start, start + size)
            batch = pack_rows([prompt_ids[i // g] for i in rows], [completion_ids[i] for i in rows],
                              self.pad_token_id, device)
            batch["advantages"] = advantages[start:start + size]
            batch["step_tokens"] = step_tokens
            if any(masked[i] for i in rows):
                keep = torch.tensor([not masked[i] for i in rows], device=device)
                batch["completion_mask"] = batch["completion_mask"] * keep[:, None].to(batch["completion_mask"].dtype)
            correct = sampling_logps is not None and opts.is_correction != "none"
            with torch.no_grad():
                if opts.num_iterations > 1 or correct:
                    batch["old_logps"] = self._logps(self.model, batch)[0]
                if correct:
                    sampled = pad_floats([sampling_logps[i] for i in rows], batch["completion_ids"].shape[1],
                                         device)
                    batch["importance"], stats = is_weights(batch["old_logps"], sampled, batch["completion_mask"],
                                                            opts.is_correction, opts.is_cap, opts.is_min)
                    self._record(stats)
                if self.reference is not None:
                    batch["ref_logps"] = self._logps(self.reference, batch)[0]
            out.append(batch)
        return out

    def _watch_signal(self, flat: bool) -> None:
        """Warn once when the first NO_SIGNAL_STEPS generations all gave every group equal rewards: no gradient,
        nothing learned (later, equal rewards mostly mean the policy has converged)."""
        self._flat_steps = self._flat_steps + 1 if flat else -(10**9)  # a signal once: never warn
        if self._flat_steps != NO_SIGNAL_STEPS or not self.is_world_process_zero():
            return
        message = (f"in the first {NO_SIGNAL_STEPS} generations, every group's completions got the same reward, "
                   "so the advantages and the gradient are 0 and nothing is learned. Check what the rewards give "
                   f"({COMPLETIONS_FILE} in the output directory shows them); a reward that rarely pays needs "
                   "more num_generations, a higher temperature, or a graded reward next to it.")
        log.warning("grpo: %s", message)
        state = getattr(self, "ft_state", None)
        if state is not None:
            state.warnings.append({"check": "grpo_no_signal", "step": self.state.global_step + 1,
                                   "message": message})

    def _report_nonfinite(self, bad, per_func, prompts, completions):
        row, j = (int(x) for x in bad.nonzero()[0])
        name = self.rewards[j].name
        log.warning("grpo: reward '%s' returned %s for %d completion(s), e.g. for prompt %s, completion %s; this "
                    "step's loss is NaN and health.on_nonfinite decides what happens (stop, skip or warn)",
                    name, float(per_func[row, j]), int(bad[:, j].sum()), shorten(repr(prompts[row]), 200),
                    shorten(repr(completions[row]), 200))

    # sample completions -> OUTPUT_DIR/completions.jsonl

    def _log_completions(self, prompts, texts, values, rewards, advantages):
        step = self.state.global_step + 1
        if not self._log_every or not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / COMPLETIONS_FILE
        if not self._log_ready:  # a resumed run drops what was logged after its checkpoint
            self._log_ready = True
            kept, dropped = [], []
            if path.is_file():
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        record = None
                    logged = record.get("step", 0) if isinstance(record, dict) else None
                    if not isinstance(logged, (int, float)) or isinstance(logged, bool):
                        dropped.append(number)  # not a record this plugin wrote (a damaged or edited line)
                    elif logged <= self.state.global_step:
                        kept.append(line + "\n")
            if dropped:
                log.warning("%s: %d line(s) that are not a completion record were dropped (lines %s%s)", path,
                            len(dropped), ", ".join(map(str, dropped[:10])), " ..." if len(dropped) > 10 else "")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(kept), encoding="utf-8")
        if step != 1 and step % self._log_every:
            return
        names = [r.name for r in self.rewards]
        with path.open("a", encoding="utf-8") as fh:
            for i, text in enumerate(texts):
                entry = {"step": step, "prompt": prompts[i], "completion": text,
                         "rewards": {n: _json_number(values[j][i]) for j, n in enumerate(names)},
                         "reward": _json_number(float(rewards[i])), "advantage": _json_number(float(advantages[i]))}
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)

