"""Checkpoints a crash cannot corrupt, resuming from them, and stopping on a signal.

Atomic saves: the Trainer writes ``checkpoint-N`` into ``.ft-tmp-checkpoint-N/`` next to the real
ones; when every rank is done, the main process adds ``ft_config.yaml`` (the resolved config),
``ft_state.json`` (ft's loss history and token counts) and ``ft_checkpoint.json`` (the size and a
digest of every file), flushes them to disk and renames the directory into place. A process that
dies while saving leaves only the ``.ft-tmp-`` directory, which is never picked up and is removed
by the next run.

Resuming: ``ft run`` on an output directory that holds checkpoints of the same config continues
from the newest one that verifies against its manifest (a damaged one is set aside as
``damaged-checkpoint-N`` and the previous one is used). Another config there is an error naming
the keys that differ. ``--fresh`` starts over (removing the old checkpoints);
``resume_from_checkpoint: PATH`` picks a checkpoint and allows deliberate changes (with a warning).
The Trainer restores the weights, optimizer, scheduler, RNG states and data position.

Signals: during training, SIGINT or SIGTERM asks for a checkpoint at the end of the current
optimizer step, then the run stops with a message saying how to resume. A second signal stops at
once (checkpoints already written stay valid).

Nothing here imports torch or transformers at module import time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.engine.cache import file_problem, write_manifest
from ft.engine.failures import disk_full_error, is_disk_full
from ft.engine.stopping import resume_command
from ft.kernel.errors import FtError

if TYPE_CHECKING:
    pass

log = logging.getLogger("ft.checkpoints")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".ft-tmp-"  # .ft-tmp-checkpoint-N/checkpoint-N while it is being written
REPLACED_PREFIX = ".ft-old-"  # a checkpoint of the same step being replaced
DAMAGED_PREFIX = "damaged-"  # set aside at start-up; never resumed from or rotated
# the earlier run that --overwrite / --fresh replaces: kept here until this run saves a checkpoint (or finishes),
# put back if it stops before then. Moved in through SETTING_ASIDE (one rename makes the set-aside whole), and
# renamed to DISCARDING before it is deleted, so a kill at any point leaves a state the next run can tell apart.
SET_ASIDE = ".ft-set-aside"
SETTING_ASIDE = ".ft-setting-aside"
DISCARDING = ".ft-set-aside-deleting"
MANIFEST_FILE = "ft_checkpoint.json"
STATE_FILE = "ft_state.json"
CONFIG_FILE = "ft_config.yaml"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


# -- finding and verifying checkpoints -------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[Checkpoint]:
    """``checkpoint-N`` directories in ``output_dir``, oldest step first (complete or not)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def verify(path: str | os.PathLike) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty when it is complete and intact)."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return [f"it has no {MANIFEST_FILE} (it was not finished, or not written by ft)"]
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"its {MANIFEST_FILE} cannot be read ({exc})"]
    problems = []
    if TRAINER_STATE_FILE not in files:
        problems.append(f"it has no {TRAINER_STATE_FILE}")
    for name, want in sorted(files.items()):
        if problem := file_problem(path, name, want, sampled=True,
                                   changed="is damaged (its content changed since it was written)"):
            problems.append(problem)
    return problems


def find_resumable(output_dir: str | os.PathLike) -> tuple[Checkpoint | None, list[tuple[Checkpoint, list[str]]]]:
    """The newest complete checkpoint, and the newer ones skipped because they are damaged."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        problems = verify(checkpoint.path)
        if not problems:
            return checkpoint, skipped
        skipped.append((checkpoint, problems))
    return None, skipped


def last_good_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    return find_resumable(output_dir)[0]


def write_checkpoint_manifest(path: Path, step: int) -> None:
    """List every file of the checkpoint with its size and (sampled) digest, flushing each to disk first."""
    from ft import __version__

    header = {"format": MANIFEST_FORMAT, "step": step, "written_by": f"ft {__version__}",
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_manifest(path, name=MANIFEST_FILE, header=header, skip=(), sampled=True, flush=fsync_path)


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk (best effort: some filesystems refuse directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories or read-only descriptors
        pass
    finally:
        os.close(fd)


# -- writing checkpoints atomically ------------------------------------------------------------------


class AtomicCheckpointsMixin:
    """Mixed into ft's Trainer: ``_save_checkpoint`` writes into a staging directory, then renames."""

    _ft_staging_root: str | None = None

    def _get_output_dir(self, trial=None):
        if self._ft_staging_root is not None:
            return self._ft_staging_root
        return super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        parent = super()
        save_atomically(self, lambda: parent._save_checkpoint(model, trial, *args, **kwargs), trial)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the checkpoint of the last step (the final save was interrupted, or the disk filled up):
        # the Trainer's epoch loop would run one more step before it checks max_steps (step 8/7 when max_steps
        # ends mid-epoch). Nothing is left to train: the run goes straight to its final save.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)


def save_atomically(trainer: Any, save: Callable[[], Any], trial: Any = None) -> Path:
    """Run the Trainer's ``save`` into ``.ft-tmp-checkpoint-N/`` and publish it as ``checkpoint-N``."""
    step = trainer.state.global_step
    run_dir = Path(trainer._get_output_dir(trial=trial))
    final = run_dir / f"checkpoint-{step}"
    root = run_dir / f"{STAGING_PREFIX}{final.name}"
    staged = root / final.name
    main = bool(trainer.args.should_save)
    accelerator = trainer.accelerator
    if main:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tokens = _global_tokens(trainer)  # a collective: every rank takes part
    trainer._ft_staging_root = str(root)
    try:
        save()
        accelerator.wait_for_everyone()
        if main:
            best = trainer.state.best_model_checkpoint
            if best and Path(best).parent == root:
                trainer.state.best_model_checkpoint = str(final)
                _rewrite_best(staged / TRAINER_STATE_FILE, str(final))
            _write_ft_files(trainer, staged, tokens)
            _null_non_finite(staged / TRAINER_STATE_FILE)
            write_checkpoint_manifest(staged, step)
            publish(staged, final)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        if main:
            shutil.rmtree(root, ignore_errors=True)  # frees what the failed save took; earlier checkpoints stay
        raise _checkpoint_disk_full(trainer, run_dir, final) from exc
    finally:
        trainer._ft_staging_root = None
    if main:
        shutil.rmtree(root, ignore_errors=True)
        discard_set_aside(run_dir)  # this run now has a checkpoint: the run it replaces can go
        keep = {final} | ({Path(trainer.state.best_model_checkpoint)} if trainer.state.best_model_checkpoint else set())
        rotate(run_dir, trainer.args.save_total_limit, keep)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def _checkpoint_disk_full(trainer: Any, run_dir: Path, final: Path) -> FtError:
    state = getattr(trainer, "ft_state", None)
    cfg = getattr(state, "cfg", None)
    good = last_good_checkpoint(run_dir)
    kept = (f"The checkpoints written before are intact (newest: {good.path.name}); free some space (or lower "
            f"save_total_limit), then run the same command again to resume from {good.path.name}"
            if good else "No earlier checkpoint was written; free some space, then run the same command again")
    command = resume_command(cfg) if cfg is not None else "ft run CONFIG"
    return disk_full_error(run_dir, final.name, f"{kept}: {command}")


def set_aside(out: Path, paths: list[Path]) -> Path | None:
    """Move ``paths`` (entries of ``out``: the earlier run) into ``out/.ft-set-aside/``; None if none."""
    paths = [p for p in paths if p.exists() or p.is_symlink()]
    if not paths:
        return None
    moving = out / SETTING_ASIDE
    shutil.rmtree(moving, ignore_errors=True)  # empty unless put_back_set_aside failed
    moving.mkdir()
    for path in paths:
        os.rename(path, moving / path.name)
    fsync_path(moving)
    os.rename(moving, out / SET_ASIDE)
    fsync_path(out)
    return out / SET_ASIDE


def discard_set_aside(out: Path) -> None:
    """This run saved (a checkpoint, or its final outputs): the earlier run it replaces is deleted now."""
    aside = out / SET_ASIDE
    if not aside.is_dir():
        return
    doomed = out / DISCARDING
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(aside, doomed)
    log.info("deleting the earlier run set aside in %s, now that this run has saved", aside)
    shutil.rmtree(doomed, ignore_errors=True)


def put_back_set_aside(out: Path) -> list[str]:
    """Put the earlier run back where it was (this run stopped before saving anything); the names put back.

    Also tidies what a killed run left: a half-done set-aside is put back, a half-done deletion finished."""
    shutil.rmtree(out / DISCARDING, ignore_errors=True)
    restored = []
    for folder in (out / SETTING_ASIDE, out / SET_ASIDE):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            target = out / entry.name
            if target.exists() or target.is_symlink():  # only if killed between a save and its deletion
                log.warning("%s was set aside by --overwrite/--fresh, but this run wrote %s since; keeping the new one",
                            entry, target)
                continue
            os.rename(entry, target)
            restored.append(entry.name)
        shutil.rmtree(folder, ignore_errors=True)
    if restored:
        fsync_path(out)
    return restored


def publish(staged: Path, final: Path) -> None:
    """Rename a finished checkpoint into place (replacing one of the same step, if any)."""
    replaced = None
    if final.exists():
        replaced = final.with_name(f"{REPLACED_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, replaced)
    os.rename(staged, final)
    fsync_path(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def rotate(run_dir: Path, limit: int | None, keep: set[Path]) -> None:
    """Keep the ``limit`` newest checkpoints (by step), plus those in ``keep``."""
    if not limit:
        return
    checkpoints = list_checkpoints(run_dir)
    excess = len(checkpoints) - max(limit, len([c for c in checkpoints if c.path in keep]))
    for checkpoint in checkpoints:
        if excess <= 0:
            break
        if checkpoint.path in keep:
            continue
        log.info("removing %s (save_total_limit %d)", checkpoint.path, limit)
        shutil.rmtree(checkpoint.path, ignore_errors=True)
        excess -= 1


def _rewrite_best(state_file: Path, best: str) -> None:
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        state["best_model_checkpoint"] = best
        state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _null_non_finite(state_file: Path) -> None:
    """The Trainer writes a NaN grad_norm in its log history as bare ``NaN``, which is not JSON: null instead."""
    from ft.engine.record import json_safe, metrics_json

    if not state_file.is_file():
        return
    text = state_file.read_text(encoding="utf-8")
    if "NaN" not in text and "Infinity" not in text:
        return
    state = json.loads(text)
    if json_safe(state) != state:
        state_file.write_text(metrics_json(state, indent=2) + "\n", encoding="utf-8")


def _global_tokens(trainer: Any) -> tuple[int, int] | None:
    state = getattr(trainer, "ft_state", None)
    if state is None:
        return None
    from ft.engine.record import global_tokens

    return global_tokens(trainer, state)


def _write_ft_files(trainer: Any, staged: Path, tokens: tuple[int, int] | None) -> None:
    state = getattr(trainer, "ft_state", None)
    if state is None:
        return
    import yaml

    from ft.engine.record import metrics_json, saveable_config

    header = f"# the resolved config of the run that wrote this checkpoint (step {trainer.state.global_step})\n"
    text = yaml.safe_dump(saveable_config(state.cfg), sort_keys=False, allow_unicode=True)
    (staged / CONFIG_FILE).write_text(header + text, encoding="utf-8")
    saved = {"history": state.history, "tokens": list(tokens) if tokens else None,
             "warnings": list(getattr(state, "warnings", [])), "data_key": getattr(state, "data_key", None),
             "loss": _loss_so_far(trainer, state)}
    (staged / STATE_FILE).write_text(metrics_json(saved, indent=1) + "\n", encoding="utf-8")  # NaN -> null


def _loss_so_far(trainer: Any, state: Any) -> dict[str, Any] | None:
    """The summed step losses of the whole run up to now, so a resumed run reports the whole run's mean."""
    before = getattr(state, "loss_at_start", None)
    total = getattr(trainer, "_total_loss_scalar", None)  # the Trainer's sum over this session, as it logged it
    if before is None or total is None:
        return None
    pending = getattr(trainer, "_tr_loss", None)  # not yet logged
    session = float(total) + (float(pending.item()) if hasattr(pending, "item") else 0.0)
    return {"sum": before[0] + session, "steps": int(trainer.state.global_step)}


def restore_ft_state(trainer: Any, checkpoint: str | os.PathLike | None, data: Any = None) -> None:
    """Before training: note which prepared data this run uses; when resuming, bring back ft's loss
    history, token counts and warnings as they were at the checkpoint, and warn if the data changed."""
    state = getattr(trainer, "ft_state", None)
    if state is None:
        return
    cache_dir = getattr(data, "cache_dir", None)
    if hasattr(state, "data_key"):
        state.data_key = Path(cache_dir).name if cache_dir else None
    if checkpoint:
        _follow_config_after_load(trainer, checkpoint)
    file = Path(checkpoint) / STATE_FILE if checkpoint else None
    if file is None or not file.is_file():
        return
    saved = json.loads(file.read_text(encoding="utf-8"))
    before, now = saved.get("data_key"), getattr(state, "data_key", None)
    if before and now and before != now:
        log.warning("the prepared data changed since %s was written (cache %s, now %s): the run continues on the "
                    "new data, so the samples after the resume point are not the ones the run would have seen. "
                    "Pass --fresh to start over on it (that deletes the checkpoints in output_dir).", checkpoint, before, now)
    state.history[:] = [dict(row) for row in saved.get("history") or []]
    if hasattr(state, "loss_at_start"):
        loss = saved.get("loss")
        state.loss_at_start = (float(loss["sum"]), int(loss["steps"])) if isinstance(loss, dict) else None
    if hasattr(state, "warnings"):
        state.warnings[:] = list(saved.get("warnings") or [])
    tokens = saved.get("tokens")
    if tokens:  # totals over all ranks: rank 0 carries them on; every rank knows where this session began
        if trainer.is_world_process_zero():
            state.counter.input_tokens, state.counter.trained_tokens = int(tokens[0]), int(tokens[1])
        if hasattr(state, "tokens_at_start"):
            state.tokens_at_start = (int(tokens[0]), int(tokens[1]))


def _follow_config_after_load(trainer: Any, checkpoint: str | os.PathLike) -> None:
    """A resumed run trains with this config's learning rate and weight decay, not the checkpoint's.

    The Trainer restores the optimizer's param groups and the scheduler's base rates from the checkpoint,
    so a learning rate changed on resume would be recorded but never used. Once everything is loaded
    (``on_train_begin``, after any engine's own loading), the restored rates are scaled by new / old, which
    keeps per-group multipliers and the schedule's position; weight decay is set where it was the old value.
    """
    import yaml
    from transformers import TrainerCallback

    state = getattr(trainer, "ft_state", None)
    file = Path(checkpoint) / CONFIG_FILE
    if state is None or not file.is_file():
        return
    try:
        saved = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return
    cfg = state.cfg
    old_lr, old_wd = saved.get("learning_rate"), saved.get("weight_decay")
    lr_changed = isinstance(old_lr, (int, float)) and old_lr > 0 and old_lr != cfg.learning_rate
    # from 0 the groups do not say which parameters decay: ft.engine.resume refuses that change
    wd_changed = isinstance(old_wd, (int, float)) and old_wd != 0 and old_wd != cfg.weight_decay
    if not (lr_changed or wd_changed):
        return

    class FollowConfig(TrainerCallback):
        done = False

        def on_train_begin(self, args, st, control, optimizer=None, lr_scheduler=None, **kwargs):
            if self.done:
                return
            self.done = True
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            groups = getattr(inner, "param_groups", None) or []
            if lr_changed:
                ratio = cfg.learning_rate / old_lr
                for group in groups:
                    for key in ("lr", "initial_lr"):
                        if isinstance(group.get(key), (int, float)):
                            group[key] *= ratio
                sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
                for attr in ("base_lrs", "_last_lr"):
                    values = getattr(sched, attr, None)
                    if isinstance(values, list):
                        setattr(sched, attr, [v * ratio for v in values])
                log.info("learning_rate %g (the checkpoint's was %g): the restored schedule is rescaled from step %d",
                         cfg.learning_rate, old_lr, st.global_step)
            if wd_changed:
                for group in groups:
                    if group.get("weight_decay") == old_wd:
                        group["weight_decay"] = cfg.weight_decay

    trainer.add_callback(FollowConfig())


# -- comparing configs ---------------------------------------------------------------------------------


def unused_name(parent: Path, name: str) -> Path:
    candidate, n = parent / name, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}-{n}"
    return candidate


# -- stopping on a signal -------------------------------------------------------------------------------


