"""Training health: stop on a non-finite loss, gradient or learning rate; warn about unhealthy curves.

Always active (block it with ``-p no:health``). Section ``health:``.

Every optimizer step, before the optimizer runs, the summed loss of the step's micro-batches, the
gradient norm and the learning rate are checked. A NaN/inf one, by default (``on_nonfinite:
stop``), stops the run with a message naming the step and the last good checkpoint, which is kept:
the bad step updates no weight and nothing after it is saved. ``skip`` drops the step (no weight
changes; after ``max_skipped_steps`` in a row it stops), ``warn`` only reports it.

The watch follows the "healthy training indicators" of the axolotl SFT reference and warns, in the
log and in the end-of-run summary / ``metrics.json`` ``warnings``, each time saying what to check:

- the loss flat or rising over the first ``loss_trend_steps`` steps (data or learning-rate problem);
- a logged grad_norm above ``grad_norm_spike`` (instability) or exactly 0.0 (frozen weights);
- the loss collapsing below ``collapse_loss`` within the first ``collapse_fraction`` of the run
  (memorising the data);
- the eval loss rising above its best while the train loss falls (overfitting);
- the learning rate NaN, always 0, or never moving although the scheduler should move it.

The checks cost one device synchronisation per optimizer step (a few scalars).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import NOT_TRAINING, FtError, Plugin

PLUGIN = Plugin()  # always active; `-p no:health` blocks it

log = logging.getLogger("ft.health")

# Schedulers whose learning rate legitimately never moves (after warmup, where they have one).
STEADY_SCHEDULERS = frozenset({"constant", "reduce_lr_on_plateau"})


class HealthOptions(BaseModel):
    """The ``health:`` section: what to do with non-finite values, and the watch's thresholds."""

    # watching and stopping do not change what a step computes: a resumed run may change them
    model_config = ConfigDict(extra="forbid", json_schema_extra=NOT_TRAINING)

    on_nonfinite: Literal["stop", "skip", "warn"] = Field(
        "stop", description="A NaN/inf loss, gradient norm or learning rate: stop (keeping the last good "
        "checkpoint), skip the step (no weight changes), or only warn.",
    )
    max_skipped_steps: int = Field(
        10, ge=1, description="With on_nonfinite: skip, stop after this many non-finite steps in a row."
    )
    watch: bool = Field(True, description="Warn about unhealthy loss, grad_norm and learning-rate curves.")
    loss_trend_steps: int = Field(
        50, ge=2, description="The loss must fall over this many first steps (at least twice the warmup)."
    )
    min_loss_drop: float = Field(
        0.02, ge=0, description="Relative drop of the loss over loss_trend_steps below which it counts as flat."
    )
    grad_norm_spike: float = Field(
        100.0, gt=0, description="A logged grad_norm above this is a spike (healthy: about 0.1-10)."
    )
    collapse_loss: float = Field(
        0.01, ge=0, description="A train loss below this early in the run counts as collapsing (memorising)."
    )
    collapse_fraction: float = Field(
        0.25, gt=0, le=1, description="'Early' for collapse_loss: this fraction of the run's steps."
    )
    eval_rise: float = Field(
        0.02, ge=0, description="Eval loss this much (relative) above its best while the train loss falls = overfitting."
    )
    eval_patience: int = Field(2, ge=1, description="Evaluations in a row above the best eval loss before warning.")


def options(cfg: Any) -> HealthOptions:
    return cfg.section("health")


@hookimpl
def ft_add_config(registry):
    registry.add("health", HealthOptions)


@hookimpl
def ft_callbacks(cfg):
    return [_callback_class()(options(cfg), cfg)]


@hookimpl
def ft_before_train(cfg, trainer):
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, _callback_class()):
            callback.attach(trainer)


# -- the watch: checks on logged values (no torch) -------------------------------------------------


class Watch:
    """Training-health checks on the values the Trainer logs. Each finding is reported once."""

    def __init__(self, opts: HealthOptions, cfg: Any) -> None:
        self.opts, self.cfg = opts, cfg
        self.judge_loss = _method_loss_is_watched(cfg)  # not RL objectives: their loss has no such shape
        self.max_steps = 0
        self.warmup = 0
        self.losses: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []
        self.lrs: list[tuple[int, float]] = []
        self.spikes: list[tuple[int, float]] = []
        self.trend_checked = False
        self.findings: list[dict[str, Any]] = []

    def begin(self, max_steps: int, warmup: int, history: list[dict[str, Any]]) -> None:
        self.max_steps, self.warmup = max_steps, warmup
        for row in history:  # a resumed run: what was logged before the checkpoint
            self.observe(row["step"], row, replay=True)

    def observe(self, step: int, logs: dict[str, Any], replay: bool = False) -> list[dict[str, Any]]:
        """Take one logged row; return new findings."""
        new: list[dict[str, Any]] = []
        opts = self.opts
        loss, grad_norm, lr, eval_loss = (_number(logs.get(k)) for k in ("loss", "grad_norm", "learning_rate",
                                                                        "eval_loss"))
        if loss is not None and math.isfinite(loss) and self.judge_loss:
            self.losses.append((step, loss))
            if loss < opts.collapse_loss and step <= opts.collapse_fraction * max(self.max_steps, 1):
                new += self._find("loss_collapse", step, self._collapse_message(step, loss))
        if grad_norm is not None:
            if grad_norm == 0.0 and self.judge_loss:
                new += self._find("grad_norm_zero", step, self._zero_grad_message(step))
            elif math.isfinite(grad_norm) and grad_norm > opts.grad_norm_spike:
                self.spikes.append((step, grad_norm))
                new += self._find("grad_norm_spike", step, self._spike_message())
        if lr is not None:
            if not math.isfinite(lr):
                new += self._find("learning_rate_nonfinite", step, self._lr_nan_message(step, lr))
            else:
                self.lrs.append((step, lr))
        if eval_loss is not None and math.isfinite(eval_loss):
            new += self._check_eval(step, eval_loss)
        if not self.trend_checked and step >= self._trend_end():
            new += self._check_trend()
        return [] if replay else new

    def end(self) -> list[dict[str, Any]]:
        """At the end of training: the checks that need the whole run."""
        new = [] if self.trend_checked else self._check_trend()
        new += self._check_lr_moves()
        for finding in self.findings:  # the spike finding counts every spike seen
            if finding["check"] == "grad_norm_spike":
                finding["message"] = self._spike_message()
        return new

    # individual checks

    def _trend_end(self) -> int:
        end = max(self.opts.loss_trend_steps, 2 * self.warmup)
        return min(end, self.max_steps) if self.max_steps else end

    def _check_trend(self) -> list[dict[str, Any]]:
        end = self._trend_end()
        points = [loss for step, loss in self.losses if step <= end]
        if len(points) < 4:
            return []
        self.trend_checked = True
        k = max(1, len(points) // 3)
        head, tail = sum(points[:k]) / k, sum(points[-k:]) / k
        drop = (head - tail) / max(abs(head), 1e-12)
        lr = f"{self.cfg.where('learning_rate')} is {self.cfg.learning_rate:g}"
        if tail > head * (1 + self.opts.min_loss_drop):
            return self._find("loss_rising", end, (
                f"the loss rose over the first {end} steps ({head:.4g} -> {tail:.4g}): the learning rate is likely too "
                f"high ({lr}; lower it or add warmup_steps). Also check the data and what is trained "
                f"({self._debug_hint()})."))
        if drop < self.opts.min_loss_drop:
            return self._find("loss_flat", end, (
                f"the loss did not fall over the first {end} steps ({head:.4g} -> {tail:.4g}, "
                f"{drop:+.1%}): check the learning rate ({lr}; too low keeps the loss flat), that tokens are trained "
                f"(train_on_inputs, roles_to_train; {self._debug_hint()}) and that the data is what you expect."))
        return []

    def _check_eval(self, step: int, eval_loss: float) -> list[dict[str, Any]]:
        earlier = list(self.evals)
        self.evals.append((step, eval_loss))
        if not earlier:
            return []
        best_step, best = min(earlier, key=lambda e: e[1])
        since_best = [e for e in self.evals if e[0] > best_step]
        above = best * (1 + self.opts.eval_rise)
        if len(since_best) < self.opts.eval_patience or not all(v > above for _, v in since_best[-self.opts.eval_patience:]):
            return []
        train_then = self._train_loss_near(best_step)
        train_now = self._train_loss_near(step)
        if train_then is None or train_now is None or train_now >= train_then:
            return []
        return self._find("eval_loss_rising", step, (
            f"the eval loss rose from {best:.4g} (step {best_step}) to {eval_loss:.4g} (step {step}) while the train loss "
            f"fell from {train_then:.4g} to {train_now:.4g}: the model is overfitting. Train for fewer steps "
            "(num_epochs/max_steps), add regularisation (weight_decay, lora dropout) or more varied data; the "
            f"checkpoint nearest step {best_step} is the better model (save_steps sets how often they are written)."))

    def _train_loss_near(self, step: int, n: int = 3) -> float | None:
        before = [loss for s, loss in self.losses if s <= step][-n:]
        return sum(before) / len(before) if before else None

    def _check_lr_moves(self) -> list[dict[str, Any]]:
        values = [lr for _, lr in self.lrs]
        if len(values) < 3:
            return []
        if all(v == 0.0 for v in values):
            return self._find("learning_rate_zero", self.lrs[-1][0], (
                f"the learning rate was 0 at every logged step: nothing is learned. Check learning_rate, "
                f"warmup_steps/warmup_ratio (longer than the run?) and lr_scheduler ({self.cfg.where('lr_scheduler')})."))
        first = values[0]
        if any(abs(v - first) > 1e-12 * max(abs(first), 1e-30) for v in values):
            return []
        name = str(self.cfg.lr_scheduler)
        if name in STEADY_SCHEDULERS or (name == "constant_with_warmup" and not self.warmup):
            return []
        return self._find("learning_rate_flat", self.lrs[-1][0], (
            f"the learning rate stayed at {first:.4g} for all {len(values)} logged steps although lr_scheduler is "
            f"'{name}' ({self.cfg.where('lr_scheduler')}): check the scheduler and warmup settings, and that a "
            "custom optimizer or scheduler plugin steps the scheduler."))

    # messages

    def _collapse_message(self, step: int, loss: float) -> str:
        return (f"the loss fell to {loss:.4g} by step {step} of {self.max_steps}: the model is memorising the data "
                "(overfitting) or the labels give the answer away. Check for duplicated or too few samples, train "
                f"fewer steps or with a lower learning rate, and check what is trained ({self._debug_hint()}).")

    def _zero_grad_message(self, step: int) -> str:
        return (f"grad_norm is 0.0 at step {step}: no weight is being trained (frozen weights). Check that the model "
                "has trainable parameters (an adapter's target_modules match real modules; nothing froze the model), "
                "that gradient checkpointing lets gradients reach them (gradient_checkpointing_kwargs: "
                "{use_reentrant: false}), and that samples have trained tokens.")

    def _spike_message(self) -> str:
        step, value = self.spikes[0]
        more = f" (above it at {len(self.spikes)} logged steps: {', '.join(str(s) for s, _ in self.spikes[:10])}" \
               f"{' ...' if len(self.spikes) > 10 else ''})" if len(self.spikes) > 1 else ""
        return (f"grad_norm {value:.4g} at step {step}, above health.grad_norm_spike {self.opts.grad_norm_spike:g}"
                f"{more}; healthy is about 0.1-10: training is unstable. Check the learning rate "
                f"({self.cfg.where('learning_rate')} is {self.cfg.learning_rate:g}), warmup, gradient clipping "
                f"(max_grad_norm {self.cfg.max_grad_norm:g}) and outlier samples (very long or broken rows).")

    def _lr_nan_message(self, step: int, lr: float) -> str:
        return (f"the learning rate is {lr} at step {step}: a configuration problem. Check learning_rate, "
                f"warmup_steps/warmup_ratio and lr_scheduler ({self.cfg.where('lr_scheduler')}), and any plugin "
                "that supplies the optimizer or scheduler.")

    def _debug_hint(self) -> str:
        return f"`ft preprocess {self.cfg.source or 'CONFIG'} --debug 3` shows the trained tokens"

    def _find(self, check: str, step: int, message: str) -> list[dict[str, Any]]:
        if any(f["check"] == check for f in self.findings):
            return []
        finding = {"check": check, "step": step, "message": message}
        self.findings.append(finding)
        return [finding]


def _method_loss_is_watched(cfg: Any) -> bool:
    """Whether the run's training method lets the watch judge its loss curve (``LOSS_WATCH``)."""
    from ft.api import LOSS_WATCH

    supports = getattr(cfg, "method_supports", None)
    return True if supports is None else supports(LOSS_WATCH)


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# -- the callback: per-step non-finite guard + the watch ---------------------------------------------


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class HealthCallback(TrainerCallback):
        """Non-finite guard before each optimizer step; the watch on every log."""

        def __init__(self, opts: HealthOptions, cfg: Any) -> None:
            self.opts, self.cfg = opts, cfg
            self.watch = Watch(opts, cfg)
            self.trainer: Any = None
            self.step_loss: Any = None
            self.skipped: list[int] = []
            self.in_a_row = 0
            self.nonfinite: dict[str, Any] | None = None

        def attach(self, trainer: Any) -> None:
            """See each micro-batch's loss (``training_step`` of this trainer instance is wrapped)."""
            self.trainer = trainer
            step_fn = trainer.training_step

            def training_step(*args: Any, **kwargs: Any) -> Any:
                loss = step_fn(*args, **kwargs)
                self._add_loss(loss)
                return loss

            trainer.training_step = training_step

        def _add_loss(self, loss: Any) -> None:
            if loss is None or not hasattr(loss, "detach"):
                return
            value = loss.detach().float().sum()
            self.step_loss = value if self.step_loss is None else self.step_loss + value

        # events

        def on_train_begin(self, args, state, control, **kwargs):
            ft_state = getattr(self.trainer, "ft_state", None)
            history = list(ft_state.history) if ft_state is not None else []
            self.watch.begin(state.max_steps, args.get_warmup_steps(state.max_steps), history)

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            loss, self.step_loss = self.step_loss, None
            model = self.trainer.model if self.trainer is not None else model
            scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
            # under fp16 the grad scaler already skips overflowing steps: only the loss is checked then
            what = _nonfinite(loss, None if scaler is not None else model, optimizer, args)
            if what is None:
                self.in_a_row = 0
                return
            step = state.global_step + 1
            action = self.opts.on_nonfinite
            if action != "warn" and scaler is None:
                _drop_gradients(model)  # the optimizer then leaves every weight as it is
            if action == "stop":
                raise self._stop(step, what)
            self.skipped.append(step)
            if action == "skip":
                self.in_a_row += 1
                if self.in_a_row >= self.opts.max_skipped_steps:
                    raise self._stop(step, f"{what} ({self.in_a_row} non-finite steps in a row, "
                                           f"health.max_skipped_steps is {self.opts.max_skipped_steps})")
            verb = "skipped (no weight changed)" if action == "skip" else "kept (health.on_nonfinite: warn)"
            if state.is_world_process_zero:
                log.warning("step %d: %s; the step was %s", step, what, verb)
            self._report_nonfinite(what, verb)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not self.opts.watch or not logs:
                return
            self._report(self.watch.observe(state.global_step, logs), state)

        def on_train_end(self, args, state, control, **kwargs):
            if self.opts.watch:
                self._report(self.watch.end(), state)

        # reporting

        def _report(self, findings: list[dict[str, Any]], state: Any) -> None:
            ft_state = getattr(self.trainer, "ft_state", None)
            for finding in findings:
                if ft_state is not None:
                    if any(w.get("check") == finding["check"] for w in ft_state.warnings if isinstance(w, dict)):
                        continue  # reported before the run was resumed
                    ft_state.warnings.append(finding)
                if state.is_world_process_zero:
                    log.warning("health: %s", finding["message"])

        def _report_nonfinite(self, what: str, verb: str) -> None:
            """One warning for all non-finite steps of the run, updated as more come."""
            if self.nonfinite is None:
                self.nonfinite = {"check": "nonfinite", "step": self.skipped[0], "message": "", "first": what}
                ft_state = getattr(self.trainer, "ft_state", None)
                if ft_state is not None:
                    ft_state.warnings.append(self.nonfinite)
            steps = ", ".join(str(s) for s in self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else "")
            self.nonfinite["message"] = (
                f"{len(self.skipped)} step(s) had a non-finite loss, gradient norm or learning rate ({steps}; at step "
                f"{self.skipped[0]} {self.nonfinite['first']}) and were {verb}. Lower the learning rate, use bf16 "
                "instead of fp16, and check the data for broken samples.")

        def _stop(self, step: int, what: str) -> FtError:
            from ft.api import close_progress_bars, last_good_checkpoint

            if self.trainer is not None:
                close_progress_bars(self.trainer)
            cfg = self.cfg
            good = last_good_checkpoint(cfg.output_dir)
            if good is not None:
                kept = (f"The last good checkpoint is {good.path} (step {good.step}); it is kept and nothing after it "
                        "was saved.")
                resume = (f" To continue from it after a change, set resume_from_checkpoint: {good.path}.")
            else:
                kept = "No checkpoint was saved before it (save_steps makes ft keep some)."
                resume = ""
            return FtError(
                f"training stopped at step {step}: {what}. The weights were not updated with it. {kept}\n"
                f"  Usual causes: a learning rate too high ({cfg.where('learning_rate')} is {cfg.learning_rate:g}), "
                "fp16 overflow (use bf16 where the GPU has it), broken or very long samples "
                f"(`ft preprocess {cfg.source or 'CONFIG'} --debug 3`), a plugin that changed the model.{resume}\n"
                "  To skip such steps instead, set `health: {on_nonfinite: skip}` (or warn)."
            )

    return HealthCallback


def _nonfinite(loss: Any, model: Any, optimizer: Any, args: Any) -> str | None:
    """What is not finite in this step (loss, gradient norm, learning rate), agreed across ranks; or None."""
    import torch

    lrs = [float(group["lr"]) for group in getattr(optimizer, "param_groups", [])]
    values = [loss if loss is not None else None, _grad_norm(model) if model is not None else None]
    device = next((v.device for v in values if v is not None), torch.device("cpu"))
    stacked = torch.stack([(v.to(device) if v is not None else torch.zeros((), device=device)).float() for v in values])
    flags = (~torch.isfinite(stacked)).float()
    flags = torch.cat([flags, torch.tensor([0.0 if all(math.isfinite(x) for x in lrs) else 1.0], device=device)])
    flags = _max_over_ranks(flags, args)
    if not flags.any():
        return None
    loss_value, norm_value = stacked.tolist()
    lost = flags.tolist()
    if lost[0]:
        return f"the loss is {_word(loss_value)}"
    if lost[1]:
        return f"the gradient norm is {_word(norm_value)}"
    bad = next((x for x in lrs if not math.isfinite(x)), float("nan"))
    return f"the learning rate is {_word(bad)}"


def _word(value: float) -> str:
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:g} on another rank"


def _grad_norm(model: Any) -> Any:
    import torch

    grads = []
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        grads.append(g.to_local() if hasattr(g, "to_local") else g)  # FSDP2 shards: this rank's part
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


def _max_over_ranks(flags: Any, args: Any) -> Any:
    if getattr(args, "world_size", 1) <= 1:
        return flags
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() != "nccl":
            flags = flags.cpu()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def _drop_gradients(model: Any) -> None:
    for p in model.parameters():
        p.grad = None
