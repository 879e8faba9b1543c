"""Push the trained model to the Hugging Face Hub: the ``hub:`` section (model_id, private, strategy).

With ``hub: {model_id: you/name}`` the run's output directory (weights or adapter, tokenizer,
``ft_config.yaml``, metrics) is uploaded in one commit when training ends. ``strategy: every_save``
also uploads each checkpoint as it is written, into the repository's ``last-checkpoint/`` folder, so
an interrupted run can be resumed from the hub. The repository is created if needed (``private``
decides its visibility when it is created). The token comes from ``HF_TOKEN`` or ``hf auth login``,
never from the config; ``HF_ENDPOINT`` points at another hub server (credentials in it are never shown in a message).

A failed push: of a checkpoint (``every_save``), a warning (in the log, the end-of-run summary and
``metrics.json``), and training goes on: the checkpoint is kept in output_dir and the next save
pushes again. Of the trained model, an error after the run has finished and its outputs are saved.

Uploads go through ``huggingface_hub``'s commit API (the Hub decides per file whether it travels in
the commit or as a large-file upload). Only the main process uploads. Not a feature: always loaded,
acts only when ``hub.model_id`` is set; blockable with ``-p no:hub``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ft import hookimpl
from ft.api import Plugin

PLUGIN = Plugin()

log = logging.getLogger("ft.hub")

CHECKPOINT_FOLDER = "last-checkpoint"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# never uploaded with the final model: checkpoints (every_save uploads them on their own) and ft's scratch
SKIP = ("checkpoint-", ".ft-", ".staging", "runs/", "__pycache__")


class HubSection(BaseModel):
    """The ``hub:`` section."""

    model_config = ConfigDict(extra="forbid")

    model_id: str | None = Field(None, description="Repository to push to, e.g. your-name/llama-1b-lora.")
    private: bool | None = Field(
        None, description="Create the repository private (true) or public (false); default: the hub's default. "
        "An existing repository keeps its visibility."
    )
    strategy: Literal["end", "every_save"] = Field(
        "end", description="end: push the final model once; every_save: also push each checkpoint to "
        f"{CHECKPOINT_FOLDER}/ as it is written."
    )
    revision: str | None = Field(None, description="Branch to push to (default: main).")


@hookimpl
def ft_add_config(registry):
    registry.add("hub", HubSection)


def section(cfg: Any) -> HubSection:
    return cfg.section("hub")


@hookimpl
def ft_validate_config(cfg):
    if cfg.hub is None:
        return None
    hub = section(cfg)
    problems = []
    if not hub.model_id:
        problems.append(f"{cfg.where('hub')}: set model_id, the repository to push to (e.g. hub: {{model_id: "
                        "your-name/my-model}}), or remove the section.")
    elif not REPO_ID.match(hub.model_id):
        problems.append(f"{cfg.where('hub', 'model_id')}: '{hub.model_id}' is not a repository id; write "
                        "OWNER/NAME, e.g. your-name/my-model.")
    from ft.api import is_installed

    if not is_installed("huggingface_hub"):
        problems.append(f"{cfg.where('hub')}: pushing needs huggingface_hub: pip install huggingface_hub.")
    return problems


def api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now, so a changed HF_ENDPOINT counts


class RedactCredentials(logging.Filter):
    """The HTTP client logs each request's URL, with the endpoint's ``user:password@`` if it has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ft.api import redact_text

        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


HTTP_LOGGERS = ("httpx", "httpx2")  # huggingface_hub's HTTP client (httpx2 from huggingface_hub 1.x on)


def redact_http_logs() -> None:
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactCredentials) for f in logger.filters):
            logger.addFilter(RedactCredentials())


def push_folder(cfg: Any, folder: Path, message: str, path_in_repo: str = "") -> Any:
    """Create the repository if needed and commit ``folder``'s files into it (one commit)."""
    from huggingface_hub import CommitOperationAdd

    redact_http_logs()
    hub = section(cfg)
    client = api()
    client.create_repo(hub.model_id, private=hub.private, exist_ok=True, repo_type="model")
    if hub.revision:
        client.create_branch(hub.model_id, branch=hub.revision, exist_ok=True)
    operations = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(SKIP) or rel.startswith(SKIP) for part in rel.split("/")):
            continue
        target = f"{path_in_repo}/{rel}" if path_in_repo else rel
        operations.append(CommitOperationAdd(path_in_repo=target, path_or_fileobj=str(path)))
    if not operations:
        return None
    info = client.create_commit(hub.model_id, operations=operations, commit_message=message,
                                revision=hub.revision, repo_type="model")
    from ft.api import redact_text

    log.info("pushed %d file(s) of %s to %s (%s)", len(operations), folder, hub.model_id,
             redact_text(str(info.commit_url)))
    return info


def _failure(cfg: Any, what: str, exc: Exception) -> str:
    """'pushing WHAT to REPO on ENDPOINT failed: WHY', the endpoint's credentials (if any) redacted."""
    from ft.api import redact_text

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    why = str(exc).splitlines()[0] if str(exc) else ""
    return redact_text(f"pushing {what} to {section(cfg).model_id} on {endpoint} failed: {type(exc).__name__}: {why}")


def _fail(cfg: Any, exc: Exception) -> Exception:
    """The final push failed: the run has finished and its outputs are in output_dir."""
    from ft.api import FtError

    hub = section(cfg)
    return FtError(f"{cfg.where('hub', 'model_id')}: {_failure(cfg, 'the trained model', exc)}. Training finished "
                   f"and the trained model is safe in {cfg.output_dir}; check HF_TOKEN (a token with write access) "
                   f"and the repository name, then push it: hf upload {hub.model_id} {cfg.output_dir}")


@hookimpl
def ft_callbacks(cfg):
    if cfg.hub is None or section(cfg).strategy != "every_save" or not section(cfg).model_id:
        return None
    from transformers import TrainerCallback

    class PushCheckpoints(TrainerCallback):
        """Uploads each checkpoint to last-checkpoint/ once it is written (main process only). A failed upload
        is a warning, not the end of training: the checkpoint stays in output_dir, the next save pushes again."""

        ft_hub_push = True
        trainer: Any = None
        failed: list[int] = []

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not folder.is_dir():
                return
            try:
                push_folder(cfg, folder, f"ft: checkpoint at step {state.global_step}", CHECKPOINT_FOLDER)
            except Exception as exc:  # noqa: BLE001 - the network must not end a training run
                self.report(state.global_step, folder, exc)

        def report(self, step: int, folder: Path, exc: Exception) -> None:
            self.failed = [*self.failed, step]
            message = (f"{_failure(cfg, f'checkpoint {step}', exc)}; training goes on ({folder} is kept; the next "
                       f"save pushes again). Check HF_TOKEN and the repository name.")
            log.warning("hub: %s", message)
            ft_state = getattr(self.trainer, "ft_state", None)
            if ft_state is None:
                return
            summary = {"check": "hub_push", "step": self.failed[0],
                       "message": f"pushing checkpoint(s) to {section(cfg).model_id} failed (checkpoint "
                                  f"{', '.join(map(str, self.failed))}); the last error: {message}"}
            for warning in ft_state.warnings:  # one warning for the run, updated
                if isinstance(warning, dict) and warning.get("check") == "hub_push":
                    warning.update(summary)
                    return
            ft_state.warnings.append(summary)

    return [PushCheckpoints()]


@hookimpl
def ft_before_train(trainer):
    for callback in trainer.callback_handler.callbacks:
        if getattr(callback, "ft_hub_push", False):
            callback.trainer = trainer  # its warnings go to the run's summary and metrics.json


@hookimpl
def ft_after_train(cfg, trainer, metrics):
    if cfg.hub is None or not section(cfg).model_id:
        return
    if trainer is not None and not trainer.is_world_process_zero():
        return
    try:
        push_folder(cfg, Path(cfg.output_dir), f"ft: trained model ({metrics.get('steps')} steps, final loss "
                    f"{metrics.get('final_loss')})")
    except Exception as exc:
        raise _fail(cfg, exc) from exc
