"""Push the trained model to the Hugging Face Hub: the ``hub:`` section (model_id, private, strategy).

With ``hub: {model_id: you/name}`` the run's output directory (weights or adapter, tokenizer,
``ft_config.yaml``, metrics) is uploaded in one commit when training ends. ``strategy: every_save``
also uploads each checkpoint as it is written, into the repository's ``last-checkpoint/`` folder, so
an interrupted run can be resumed from the hub. The repository is created if needed (``private``
decides its visibility when it is created). The token comes from ``HF_TOKEN`` or ``hf auth login``,
never from the config; ``HF_ENDPOINT`` points at another hub server.

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

FT_FEATURE = False

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


def push_folder(cfg: Any, folder: Path, message: str, path_in_repo: str = "") -> Any:
    """Create the repository if needed and commit ``folder``'s files into it (one commit)."""
    from huggingface_hub import CommitOperationAdd

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
    log.info("pushed %d file(s) of %s to %s (%s)", len(operations), folder, hub.model_id, info.commit_url)
    return info


def _fail(cfg: Any, what: str, exc: Exception) -> Exception:
    from ft.api import FtError

    hub = section(cfg)
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return FtError(f"{cfg.where('hub', 'model_id')}: pushing {what} to {hub.model_id} on {endpoint} failed: "
                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. The trained model is safe "
                   f"in {cfg.output_dir}; check HF_TOKEN (a token with write access) and the repository name, then "
                   "push it with `hf upload`.")


@hookimpl
def ft_callbacks(cfg):
    if cfg.hub is None or section(cfg).strategy != "every_save" or not section(cfg).model_id:
        return None
    from transformers import TrainerCallback

    class PushCheckpoints(TrainerCallback):
        """Uploads each checkpoint to last-checkpoint/ once it is written (main process only)."""

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not folder.is_dir():
                return
            try:
                push_folder(cfg, folder, f"ft: checkpoint at step {state.global_step}", CHECKPOINT_FOLDER)
            except Exception as exc:
                raise _fail(cfg, f"checkpoint {state.global_step}", exc) from exc

    return [PushCheckpoints()]


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
        raise _fail(cfg, "the trained model", exc) from exc
