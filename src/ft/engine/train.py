"""Build the Hugging Face Trainer from the config and plugins, run it, and measure what it did.

``build_trainer`` turns the core config into ``TrainingArguments`` (or the method's
``Method.arguments_class``), merges what plugins add (``ft_trainer_args``), picks the optimizer and
scheduler by name from the registries, the Trainer class (the chosen method's ``Method.trainer_class``,
with ``FtTrainerMixin`` mixed in), the collator (``ft_collator``, else the method's ``Method.collator``)
and callbacks (``ft_callbacks``).
``run_training`` trains and returns the run's metrics; running out of memory ends with the
usual remedies instead of a traceback.

torch and transformers are imported inside functions: importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ft.engine.arguments import (
    cadence_callbacks,
    launched_world_size,
    resolve_precision,
    row_unit,
    steps_per_epoch,
    train_rows,
    training_arguments,
    training_arguments_class,
)
from ft.engine.checkpoints import AtomicCheckpointsMixin
from ft.engine.failures import refused_pickle
from ft.kernel.config_checks import batch_warnings, real_effective_batch
from ft.kernel.errors import (
    FtError,
    PluginError,
    attributed,
    defined_at,
    is_out_of_memory,
)
from ft.kernel.formats import IGNORE_INDEX

if TYPE_CHECKING:
    from ft.engine.resume import ResumePlan
    from ft.kernel.context import Context

log = logging.getLogger("ft.train")

HISTORY_KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss")


# -- precision -------------------------------------------------------------------------------


# -- seeding ---------------------------------------------------------------------------------


# -- what ft adds to any Trainer ---------------------------------------------------------------


class TokenCounter:
    """Counts real (non-pad) input tokens and trained tokens (labels != -100) per micro-batch."""

    def __init__(self) -> None:
        self.input_tokens: Any = 0
        self.trained_tokens: Any = 0

    def add(self, inputs: dict[str, Any]) -> None:
        ids, mask, labels = inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("labels")
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            self.input_tokens = self.input_tokens + mask.sum()
        elif ids is not None:  # packed rows (position_ids or a 4D mask): every position is real
            self.input_tokens = self.input_tokens + ids.numel()
        if labels is not None:
            self.trained_tokens = self.trained_tokens + labels.ne(IGNORE_INDEX).sum()

    def totals(self) -> tuple[int, int]:
        return int(self.input_tokens), int(self.trained_tokens)


@dataclasses.dataclass
class FtState:
    """What build_trainer hands to the trainer instance (read by FtTrainerMixin and the callbacks)."""

    cfg: Any
    counter: TokenCounter
    history: list[dict[str, Any]]
    optimizer_factory: Callable[..., Any] | None = None
    scheduler_factory: Callable[..., Any] | None = None
    started: float | None = None
    warnings: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # plugins' health findings
    tokens_at_start: tuple[int, int] = (0, 0)  # counted before this session (a resumed run)
    loss_at_start: tuple[float, int] | None = (0.0, 0)  # (summed step losses, steps) before it; None: unknown
    data_key: str | None = None  # the prepared-data cache key, saved with checkpoints
    metric_names: tuple[str, ...] = ()  # the method's metrics (kept in the history, plotted)
    method_owner: tuple[str, Any] | None = None  # (plugin, an object of its module): errors in method code name it


STOP_GRACE_SECONDS = 5.0  # after SIGINT/SIGTERM, how long a step may go on before a method abandons it


class StepAbandoned(FtError):
    """A stop signal came and the step did not end within STOP_GRACE_SECONDS: nothing of it is saved
    (``run_training`` says which checkpoint is kept)."""

    def __init__(self, request: Any, step: int, doing: str):
        super().__init__(f"step {step} abandoned while {doing}")
        self.request, self.step, self.doing = request, step, doing


class FtTrainerMixin(AtomicCheckpointsMixin):
    """Mixed into whichever Trainer class runs: counts tokens, builds factory optimizers/schedulers,
    writes checkpoints atomically (``ft.engine.checkpoints``), names the method's plugin when its code raises."""

    ft_state: FtState | None = None
    ft_stop: Any = None  # the StopRequest of this run (``ft.engine.stopping.stop_on_signals``), set by run_training

    def training_step(self, model, inputs, *args, **kwargs):
        if self.ft_state is not None:
            self.ft_state.counter.add(inputs)
        return self._ft_method_code("training_step", super().training_step, model, inputs, *args, **kwargs)

    def compute_loss(self, *args, **kwargs):
        return self._ft_method_code("compute_loss", super().compute_loss, *args, **kwargs)

    def _ft_method_code(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(...)``; an exception from it is a PluginHookError naming the method's plugin and file:line."""
        owner = self.ft_state.method_owner if self.ft_state is not None else None
        if owner is None:
            return fn(*args, **kwargs)
        plugin, origin = owner
        place = f"method '{self.ft_state.cfg.method}': its Trainer's {name}"
        return attributed(fn, plugin, "ft_register_methods", place, origin=origin)(*args, **kwargs)

    def ft_check_stop(self, doing: str, grace: float = STOP_GRACE_SECONDS) -> None:
        """Abandon the step (raise :class:`StepAbandoned`) when SIGINT/SIGTERM came ``grace`` seconds ago or more.

        A method calls it while it waits on something long inside a step (rewards, generation), so that the first
        Ctrl-C stops the run within seconds: a step that ends in time saves a checkpoint as usual; an abandoned
        one saves nothing, and the newest complete checkpoint is kept. ``doing`` says what was going on.
        """
        request = self.ft_stop
        if request is not None and request.signum is not None and time.monotonic() - request.at >= grace:
            raise StepAbandoned(request, self.state.global_step + 1, doing)

    def ft_record(self, metrics: dict[str, Any]) -> None:
        """Add one micro-batch's values of the method's metrics (floats or 0-d tensors; no host sync).

        Training values are averaged over each logging window and logged with the loss; values
        recorded during evaluation are averaged over the evaluation and logged as ``eval_<name>``.
        """
        phase = "train" if self.model.training else "eval"
        store = self.__dict__.setdefault("_ft_metric_sums", {"train": {}, "eval": {}})[phase]
        for name, value in metrics.items():
            value = value.detach().float() if hasattr(value, "detach") else float(value)
            total, count = store.get(name, (0.0, 0))
            store[name] = (total + value, count + 1)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        sums = self.__dict__.get("_ft_metric_sums")
        if sums:
            phase, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
            if "loss" in logs or phase == "eval":
                for name, (total, count) in sums[phase].items():
                    logs[f"{prefix}{name}"] = self._ft_mean(total, count)
                    st = self.ft_state
                    if st is not None and name not in st.metric_names:  # names that depend on the config
                        st.metric_names = (*st.metric_names, name)  # (a GRPO run's rewards) are kept too
                sums[phase].clear()
        return super().log(logs, *args, **kwargs)

    def _ft_mean(self, total: Any, count: int) -> float:
        mean = total / max(count, 1)
        if self.args.world_size > 1 and hasattr(mean, "to"):
            mean = self.accelerator.reduce(mean.to(self.accelerator.device), reduction="mean")
        return round(float(mean), 6)

    def create_optimizer(self, *args, **kwargs):
        st = self.ft_state
        if self.optimizer is None and st is not None and st.optimizer_factory is not None:
            model = args[0] if args else kwargs.get("model")
            self.optimizer = st.optimizer_factory(st.cfg, model if model is not None else self.model)
        return super().create_optimizer(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None):
        st = self.ft_state
        if self.lr_scheduler is None and st is not None and st.scheduler_factory is not None:
            self.lr_scheduler = st.scheduler_factory(st.cfg, optimizer or self.optimizer, num_training_steps)
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)


def _with_mixin(cls: Any, method: Any) -> type:
    from transformers import Trainer

    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise FtError(f"method '{method.name}' gave the Trainer class {cls!r}, which is not a subclass of "
                      "transformers.Trainer; fix the plugin that registers the method.")
    if issubclass(cls, FtTrainerMixin):
        return cls
    return type(f"Ft{cls.__name__}", (FtTrainerMixin, cls), {"__module__": cls.__module__})


def _callbacks(state: FtState) -> list[Any]:
    from transformers import ProgressCallback, TrainerCallback

    class MetricsHistory(TrainerCallback):
        """Keeps loss, lr, grad_norm (and eval loss) per logged step; logs the last step too."""

        def on_train_begin(self, args, st, control, **kwargs):
            state.started = time.perf_counter()

        def on_step_end(self, args, st, control, **kwargs):
            if st.global_step >= st.max_steps and args.logging_strategy == "steps":
                control.should_log = True  # so the final loss is the loss of the final steps
            return control

        def on_log(self, args, st, control, logs=None, **kwargs):
            keys = (*HISTORY_KEYS, *state.metric_names, *(f"eval_{m}" for m in state.metric_names))
            row = {k: float(logs[k]) for k in keys if k in (logs or {})}
            if not row:
                return
            tokens, trained = state.counter.totals()
            elapsed = time.perf_counter() - state.started if state.started else 0.0
            session = tokens - state.tokens_at_start[0]
            row = {"step": st.global_step, "epoch": round(float(st.epoch or 0.0), 4), **row,
                   "train_tokens": tokens, "trained_tokens": trained,
                   "tokens_per_second": round(session / elapsed, 2) if elapsed > 0 else None}
            if state.history and state.history[-1]["step"] == row["step"]:
                state.history[-1].update(row)
            else:
                state.history.append(row)

    def step_line(st: Any, logs: dict[str, Any] | None) -> str | None:
        keys = (*HISTORY_KEYS, *state.metric_names[:4])
        parts = [f"{k.replace('learning_rate', 'lr')} {logs[k]:.4g}" for k in keys if k in (logs or {})]
        if not parts:
            return None
        if state.history and state.history[-1].get("tokens_per_second"):
            parts.append(f"tok/s {state.history[-1]['tokens_per_second']:,.0f}")
        return f"step {st.global_step}/{st.max_steps}  " + "  ".join(parts)

    class Progress(ProgressCallback):
        """The training bar, with one short line per logged step instead of a dict dump."""

        def on_log(self, args, st, control, logs=None, **kwargs):
            line = step_line(st, logs) if st.is_world_process_zero and self.training_bar is not None else None
            if line:
                self.training_bar.write(line)

    class StepLines(TrainerCallback):
        """Without a progress bar (output to a file or pipe): the same line per logged step, nothing else."""

        def on_log(self, args, st, control, logs=None, **kwargs):
            line = step_line(st, logs) if st.is_world_process_zero else None
            if line:
                print(line, flush=True)

    return [MetricsHistory(), Progress(), StepLines()]


def patch_check_callback(watch: Any) -> Any:
    """A callback that checks, after this session's first training step, that every kernel patch is in
    effect (``ft.engine.patch_watch.PatchWatch.verify``): a patch that was undone or never ran stops the run."""
    from transformers import TrainerCallback

    class PatchCheck(TrainerCallback):
        def on_step_end(self, args, st, control, **kwargs):
            if not watch.verified:
                watch.verify(st.global_step)
            return control

    return PatchCheck()


# -- TrainingArguments -------------------------------------------------------------------------


# -- optimizer and scheduler ---------------------------------------------------------------------


def _choose(registry: Any, name: str, key_path: str) -> tuple[str | None, Callable[..., Any] | None]:
    """A registry value: a transformers name (-> TrainingArguments) or a factory (-> built by ft)."""
    value = registry.get(name, key_path).value
    if hasattr(value, "check"):
        value.check()  # e.g. 8-bit optimizers say how to install bitsandbytes
    if isinstance(value, str):
        return str(value), None
    if callable(value):
        return None, value
    raise FtError(f"{key_path}: '{name}' is registered with {value!r}, which is neither a transformers name "
                  "nor a factory callable; fix the plugin that registers it.")


# -- building and running ------------------------------------------------------------------------


def build_trainer(ctx: Context, model: Any, tokenizer: Any, data: Any) -> Any:
    """The Trainer of this run's method: core arguments + plugin arguments, registries, collator,
    callbacks, and whatever extra arguments the method needs (a reference model, rewards)."""
    cfg, method = ctx.cfg, ctx.method
    eval_data = getattr(data, "eval", None)
    args_cls = method.arguments_class() if method.arguments_class else training_arguments_class()
    args = training_arguments(cfg, has_eval=eval_data is not None, steps_per_epoch=steps_per_epoch(cfg, data.train))
    for warning in batch_warnings(cfg, train_rows(cfg, data.train), launched_world_size(), unit=row_unit(ctx)):
        log.warning(warning)

    optim, optimizer_factory = _choose(ctx.registries.optimizers, cfg.optimizer, cfg.where("optimizer"))
    sched, scheduler_factory = _choose(ctx.registries.schedulers, cfg.lr_scheduler, cfg.where("lr_scheduler"))
    if optim:
        args["optim"] = optim
    if sched:
        args["lr_scheduler_type"] = sched

    fields = {f.name for f in dataclasses.fields(args_cls)}
    plugin_args = ctx.pm.call("ft_trainer_args", cfg=cfg)
    for key, value in plugin_args.items():
        if key not in fields:
            owner = plugin_args.owners[key]
            raise PluginError(f"plugin '{owner}' sets TrainingArguments field '{key}' in ft_trainer_args"
                              f"{ctx.pm.at('ft_trainer_args', owner)}, which this transformers version does not have.")
        if key in args and args[key] != value:
            log.info("TrainingArguments %s=%r (set by a plugin; the config gave %r)", key, value, args[key])
        args[key] = value
    try:
        training_args = args_cls(**args)
    except (ValueError, TypeError) as exc:
        raise FtError(f"the training settings are inconsistent: {exc}") from exc

    # the method's own code (collator, Trainer class, its keyword arguments, its loss) names its plugin when it raises
    plugin = ctx.registries.methods.get(cfg.method, cfg.where("method")).plugin
    hook, origin = "ft_register_methods", method.trainer_class

    def method_code(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
        return attributed(fn, plugin, hook, f"method '{method.name}': {what}", origin=origin)

    collator = _collator(ctx, tokenizer, method, plugin)
    method_cls = method_code(method.trainer_class, "its trainer_class")()
    trainer_cls = _with_mixin(method_cls, method)
    extra = {}
    if method.trainer_kwargs:
        extra = method_code(method.trainer_kwargs, "its trainer_kwargs")(cfg=cfg, model=model, tokenizer=tokenizer,
                                                                          data=data)
    state = FtState(cfg, TokenCounter(), [], optimizer_factory, scheduler_factory, metric_names=method.metrics,
                    method_owner=(plugin, origin))
    ft_callbacks = _callbacks(state)
    built_with = (f" with the keys its trainer_kwargs returned ({', '.join(map(str, extra))}; "
                  f"{defined_at(method.trainer_kwargs)})" if extra else "")
    construct = method_code(lambda **kwargs: trainer_cls(**kwargs),
                            f"its Trainer {getattr(method_cls, '__name__', method_cls)} ({defined_at(method_cls)}), "
                            f"built{built_with}")

    trainer = construct(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=data.train,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[*_plugin_callbacks(ctx), *cadence_callbacks(cfg, eval_data is not None), ft_callbacks[0]],
        **(extra or {}),
    )
    trainer.ft_state = state
    from transformers import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:  # absent when tqdm is disabled
        trainer.add_callback(ft_callbacks[1])
    else:  # no bar: transformers prints each log dict instead; ft prints its step line
        from transformers.trainer_callback import PrinterCallback

        trainer.pop_callback(PrinterCallback)
        trainer.add_callback(ft_callbacks[2])
    return trainer


def run_training(ctx: Context, trainer: Any, data: Any, plan: ResumePlan | None = None) -> dict[str, Any]:
    """Train from where ``plan`` says (``ft.engine.resume.plan_resume``; None: from step 0) and return the
    run's metrics. SIGINT/SIGTERM save a checkpoint and stop (``ft.engine.checkpoints``)."""
    from ft.engine.checkpoints import restore_ft_state
    from ft.engine.record import global_tokens
    from ft.engine.stopping import interrupted_error, stop_on_signals

    cfg = ctx.cfg
    resume = plan.shared().checkpoint if plan is not None else None  # every rank follows the main process
    restore_ft_state(trainer, resume, data)
    try:
        with stop_on_signals(trainer) as stop:
            trainer.ft_stop = stop  # a method's long waits inside a step look at it (FtTrainerMixin.ft_check_stop)
            output = trainer.train(resume_from_checkpoint=resume)
    except StepAbandoned as exc:
        close_progress_bars(trainer)
        raise abandoned_error(ctx, trainer, exc) from None
    except Exception as exc:
        if is_out_of_memory(exc):
            close_progress_bars(trainer)
            _free_memory()
            raise FtError(out_of_memory_message(cfg)) from exc
        refused = refused_pickle(exc)
        if refused is not None and resume:
            close_progress_bars(trainer)
            raise FtError(
                f"cannot resume from {resume}: one of its files holds an object that torch refuses to load "
                f"({refused}; weights_only=True), because loading it could run code. Resume from another "
                "checkpoint (resume_from_checkpoint: PATH), or start over with --fresh (which deletes the "
                "checkpoints in output_dir)."
            ) from None
        raise
    if stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        raise interrupted_error(ctx, trainer, stop)

    state: FtState | None = getattr(trainer, "ft_state", None)
    history = state.history if state is not None else []
    eval_loss = None
    if getattr(data, "eval", None) is not None:
        last = next((r for r in reversed(history) if "eval_loss" in r), None)
        if last is not None and last["step"] == trainer.state.global_step:
            eval_loss = last["eval_loss"]
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])

    tokens, trained = global_tokens(trainer, state)
    session_tokens = tokens - (state.tokens_at_start[0] if state is not None else 0)
    seconds = float(output.metrics.get("train_runtime") or 0.0)
    final_loss = next((r["loss"] for r in reversed(history) if "loss" in r), None)
    metrics: dict[str, Any] = {
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "train_tokens": tokens,
        "trained_tokens": trained,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(session_tokens / seconds, 2) if seconds > 0 else None,
        "final_loss": final_loss,
        "train_loss": whole_run_loss(trainer, state, float(output.training_loss)),
        "eval_loss": eval_loss,
        "effective_batch_size": real_effective_batch(cfg, train_rows(cfg, data.train), trainer.args.world_size),
        "samples": len(data.train) if hasattr(data.train, "__len__") else None,
        "precision": resolve_precision(cfg),
        "method": cfg.method,
        "method_metrics": _last_values(history, state.metric_names if state is not None else ()),
        "resumed_from": str(resume) if resume else None,
        "warnings": list(state.warnings) if state is not None else [],
    }
    return metrics


def abandoned_error(ctx: Context, trainer: Any, exc: StepAbandoned) -> Any:
    """The message of a run stopped by a signal inside a step that did not end in time: what was kept."""
    from ft.engine.checkpoints import last_good_checkpoint
    from ft.engine.stopping import Interrupted, resume_command

    cfg, request = ctx.cfg, exc.request
    last = last_good_checkpoint(cfg.output_dir)
    kept = (f"the newest complete checkpoint, {last.path} (step {last.step}), is where a resumed run starts.\n"
            f"  To resume, run the same command again: {resume_command(cfg)}" if last
            else f"there is no checkpoint yet, so running it again starts over: {resume_command(cfg)}")
    return Interrupted(
        f"stopped by {request.name} during step {exc.step} of {trainer.state.max_steps}, while {exc.doing}: the step "
        f"did not end within {STOP_GRACE_SECONDS:g} s of the signal, so it was abandoned and nothing of it was saved; "
        f"{kept}",
        int(request.signum),
    )


def _last_values(history: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, float]:
    """Each metric's value in the last logged row that has it."""
    out: dict[str, float] = {}
    for name in names:
        row = next((r for r in reversed(history) if name in r), None)
        if row is not None:
            out[name] = row[name]
    return out


def whole_run_loss(trainer: Any, state: FtState | None, session_loss: float) -> float:
    """The mean step loss of the whole run: the Trainer's covers only this session when it resumed."""
    before = state.loss_at_start if state is not None else None
    steps = int(trainer.state.global_step)
    if before is None or steps <= 0:
        return session_loss
    loss_sum, steps_before = before
    return (loss_sum + session_loss * (steps - steps_before)) / steps


def history_of(trainer: Any) -> list[dict[str, Any]]:
    """Per-step loss / lr / grad_norm rows (ft's own, else rebuilt from the Trainer's log history)."""
    state = getattr(trainer, "ft_state", None)
    if state is not None:
        return list(state.history)
    rows = []
    for entry in trainer.state.log_history:
        row = {k: entry[k] for k in HISTORY_KEYS if k in entry}
        if row:
            rows.append({"step": entry.get("step"), "epoch": entry.get("epoch"), **row})
    return rows


# -- out of memory ---------------------------------------------------------------------------------


def out_of_memory_message(cfg: Any) -> str:
    effective = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    smaller = max(1, cfg.micro_batch_size // 2)
    lines = [
        f"ran out of memory while training (micro_batch_size {cfg.micro_batch_size}, sequence_len "
        f"{cfg.sequence_len}, gradient_checkpointing {'on' if cfg.gradient_checkpointing else 'off'}). To fit:"
    ]
    if cfg.micro_batch_size > 1:
        accumulate = math.ceil(effective / smaller)
        lines.append(f"  - lower micro_batch_size ({cfg.where('micro_batch_size')}), e.g. micro_batch_size: {smaller} "
                     f"with gradient_accumulation_steps: {accumulate} to keep the effective batch size of {effective}")
    if not cfg.gradient_checkpointing:
        lines.append("  - set gradient_checkpointing: true (recomputes activations; slower, much less memory)")
    lines.append(f"  - use a shorter sequence_len ({cfg.where('sequence_len')}), e.g. sequence_len: "
                 f"{max(128, cfg.sequence_len // 2)}")
    if cfg.micro_batch_size == 1:
        lines.append("  - micro_batch_size is already 1")
    lines.append("  - train an adapter instead of the full model: -p lora (with -p qlora to quantize the base model)")
    return "\n".join(lines)


def close_progress_bars(trainer: Any) -> None:
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort; the message matters more
        pass


def _collator(ctx: Any, tokenizer: Any, method: Any, method_plugin: str) -> Any:
    """A feature plugin's collator (``ft_collator``: packing), else the method's own (``method_plugin``
    registered it; an exception it raises names that plugin, like a callback's)."""
    plugin, collator = ctx.pm.first("ft_collator", cfg=ctx.cfg, tokenizer=tokenizer, method=method)
    if collator is None:
        place = f"method '{method.name}': its collator"
        collator = attributed(method.collator, method_plugin, "ft_register_methods", f"{place} factory")(ctx.cfg,
                                                                                                           tokenizer)
        if not callable(collator):
            raise ctx.pm.contract_error("ft_register_methods", method_plugin, collator,
                                        "a Method whose collator(cfg, tokenizer) returns a callable list[row] -> dict")
        collator = attributed(collator, method_plugin, "ft_register_methods", place)
    return collator


def _plugin_callbacks(ctx: Any) -> list[Any]:
    """Every plugin's ``ft_callbacks``, each event method raising a PluginHookError that names its plugin."""
    out = []
    for plugin, callbacks in ctx.pm.each("ft_callbacks", cfg=ctx.cfg):
        for callback in callbacks or []:
            for event in dir(callback):
                if event.startswith("on_"):
                    setattr(callback, event, attributed(getattr(callback, event), plugin, "ft_callbacks",
                                                        f"its callback {type(callback).__name__}.{event}"))
            out.append(callback)
    return out
