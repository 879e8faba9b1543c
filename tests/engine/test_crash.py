"""A crash never loses a run: atomic checkpoints, resume, signals, a killed data build, safe defaults.

The kill tests run ``ft run`` in a subprocess with a small plugin that pauses it at a known point
(a marker file says it is there), so the kill lands where the test means it to, on any machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, SecretStr

from ft import hookimpl
from ft.engine.checkpoints import MANIFEST_FILE, list_checkpoints, verify
from ft.kernel.errors import FtError
from ft.run import run

MAX_STEPS = 8
SAVE_STEPS = 3
SECRETS = {"api_key": "sk-test-4fd1c0ffee", "hub_token": "hf_testtoken_9b8a7c", "password": "hunter2-xyz",
           "openai_api_key": "sk-openai-1e1e1e", "api_token": "tok-api-2f2f2f", "github_token": "ghp_3a3a3a3a",
           "mirror": "https://mirror-user:url-pass-4b4b4b@example.invalid/models",
           "signed_url": "https://b.example.invalid/d.jsonl?X-Amz-Date=2026&X-Amz-Signature=amzsig-6c6c6c",
           "endpoint": "https://api.example.invalid/v1?access_token=qs-tok-8f8f8f&sig=qs-sig-9a9a9a",
           "request_header": "Authorization: Bearer bearer-7e7e7e"}
SECRET_PARTS = ["url-pass-4b4b4b", "amzsig-6c6c6c", "qs-tok-8f8f8f", "qs-sig-9a9a9a", "bearer-7e7e7e"]
ENV_SECRETS = {"HF_TOKEN": "hf_envtoken_5e5e5e", "WANDB_API_KEY": "wandb-envkey-7d7d7d"}


pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


def write_run(root: Path, model_dir: Path, **overrides) -> Path:
    """Eight conversations; 2 optimizer steps per epoch (micro batch 2 x accumulation 2), so 8 steps cross
    epochs and a checkpoint every 3 steps lands mid-epoch."""
    from ft.tools.tiny import make_chat_rows, write_jsonl

    data = root / "chat.jsonl"
    if not data.exists():
        write_jsonl(data, make_chat_rows(8, seed=3))
    config = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "chat_template"}],
        "dataset_prepared_path": str(root / "prepared"),
        "dataset_num_proc": 1,
        "output_dir": str(root / "out"),
        "sequence_len": 128,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "logging_steps": 1,
        "learning_rate": 1.0e-3,
        "seed": 1,
        **overrides,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def history(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in json.loads((out / "metrics.json").read_text())["history"]}


class VaultSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_key: str = ""
    hub_token: str = ""
    password: str = ""
    openai_api_key: str = ""
    api_token: str = ""
    github_token: str = ""
    mirror: str = ""  # credentials inside a URL
    signed_url: str = ""  # ... in its query string
    endpoint: str = ""
    request_header: str = ""  # an authorization header value
    signing_key: SecretStr = SecretStr("")


class Vault:
    """A plugin with secrets in its config section (as a hub-upload or tracker plugin would have)."""

    @hookimpl
    def ft_add_config(registry):
        registry.add("vault", VaultSection)


@pytest.fixture
def vault():
    from ft.tools.testing import registered_plugin

    with registered_plugin(Vault, "vault"):
        yield


@pytest.fixture(scope="module")
def reference(ft_tiny_model_dir, tmp_path_factory):
    """One uninterrupted run (the losses every resumed run must reproduce); its config carries secrets,
    secrets are in the environment, and everything it logs is captured."""
    import contextlib
    import io
    import logging

    from ft.tools.testing import registered_plugin

    root = tmp_path_factory.mktemp("reference")
    config = write_run(root, ft_tiny_model_dir, vault={**SECRETS, "signing_key": "sk-signing-0a0a0a"})
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.DEBUG)
    root_logger = logging.getLogger()
    saved_level, saved_env = root_logger.level, {k: os.environ.get(k) for k in ENV_SECRETS}
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    os.environ.update(ENV_SECRETS)
    try:
        with registered_plugin(Vault, "vault"), contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs):
            result = run(config)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(saved_level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return root, config, result, logs.getvalue()


def copy_of_run(reference, tmp_path, finished: bool = False) -> tuple[Path, Path]:
    """The reference run's output directory, as a crash before the final save would have left it
    (the same config: tests using it take the ``vault`` fixture)."""
    root, _, _, _ = reference
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    if not finished:
        for name in ("model.safetensors", "metrics.json"):
            (out / name).unlink()
    config = tmp_path / "config.yaml"
    data = yaml.safe_load((root / "config.yaml").read_text())
    data["output_dir"] = str(out)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config, out


# -- killing a run ----------------------------------------------------------------------------------

PAUSING_RUN = textwrap.dedent('''
    """ft run with a plugin that pauses at {where}: writes the marker, then waits for the go file."""
    import sys
    import time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from ft import hookimpl
    from ft.kernel.plugins import add_process_plugin

    config, marker, go, where = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    kind, step = where.split(":")


    def pause():
        marker.write_text("paused")
        deadline = time.monotonic() + 600  # only a guard against a test that never says go
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


    class Pause:
        @hookimpl
        def ft_callbacks(cfg):
            from transformers import TrainerCallback

            class AtStepEnd(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if kind == "step_end" and state.global_step == int(step):
                        pause()

            return [AtStepEnd()]

        @hookimpl
        def ft_before_train(trainer):
            save_optimizer = trainer._save_optimizer_and_scheduler

            def slow_save(output_dir):  # the weights are written; the optimizer state is not yet
                if kind == "saving" and trainer.state.global_step == int(step):
                    pause()
                return save_optimizer(output_dir)

            trainer._save_optimizer_and_scheduler = slow_save
            if kind == "final":  # inside the final save: the weights are written, the tokenizer is not yet
                tokenizer = trainer.processing_class
                save_tokenizer = tokenizer.save_pretrained

                def slow_tokenizer_save(directory, *args, **kwargs):  # checkpoints save the tokenizer too
                    if Path(directory).name == ".ft-tmp-final":
                        pause()
                    return save_tokenizer(directory, *args, **kwargs)

                tokenizer.save_pretrained = slow_tokenizer_save


    add_process_plugin("pause", Pause)
    sys.argv = ["ft", "run", config]
    from ft.cli import main

    main()
''')


class PausedRun:
    """``ft run`` in a subprocess, paused at ``where`` ("step_end:N", "saving:N" or "final:0", inside the
    final save)."""

    def __init__(self, tmp_path: Path, config: Path, where: str):
        self.dir = tmp_path
        script = tmp_path / "pausing_run.py"
        script.write_text(PAUSING_RUN)
        self.marker, self.go = tmp_path / "paused", tmp_path / "go"
        self.stderr_file = tmp_path / "stderr.txt"
        with open(tmp_path / "stdout.txt", "wb") as out, open(self.stderr_file, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(config), str(self.marker), str(self.go), where],
                stdout=out, stderr=err, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
        self.wait_for(lambda: self.marker.exists(), f"the run to reach {where}")

    def wait_for(self, condition, what: str, limit: float = 600) -> None:
        deadline = time.monotonic() + limit  # a hang guard, not a speed requirement
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.stderr[-4000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def resume(self) -> None:
        self.go.write_text("go")

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=600)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_sigkill_while_saving_then_resume_reproduces_the_uninterrupted_losses(reference, ft_tiny_model_dir, tmp_path):
    """Killed (SIGKILL) in the middle of writing checkpoint-6: the half-written checkpoint is never picked up;
    ``ft run`` resumes from checkpoint-3 (mid-epoch) and every later step matches the uninterrupted run."""
    _, _, ref, _ = reference
    config = write_run(tmp_path, ft_tiny_model_dir)
    out = tmp_path / "out"
    paused = PausedRun(tmp_path, config, "saving:6")
    paused.proc.kill()
    assert paused.finish() == -signal.SIGKILL

    staging = out / ".ft-tmp-checkpoint-6" / "checkpoint-6"
    assert (staging / "model.safetensors").is_file(), "the kill landed in the middle of the save"
    assert not (staging / "optimizer.pt").exists()
    assert [c.path.name for c in list_checkpoints(out)] == ["checkpoint-3"]
    assert verify(out / "checkpoint-3") == []
    assert not (out / "model.safetensors").exists()

    resumed = run(config)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-3")
    assert not (out / ".ft-tmp-checkpoint-6").exists(), "the leftover of the killed save is removed"
    assert resumed.metrics["steps"] == MAX_STEPS

    want, got = history(Path(ref.output_dir)), history(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), "metrics.json holds the whole run, resumed or not"
    for step in range(SAVE_STEPS + 1, MAX_STEPS + 1):  # trained again after the resume
        for key in ("loss", "grad_norm", "learning_rate"):
            a, b = want[step][key], got[step][key]
            assert abs(a - b) <= 1e-4 * abs(a), (step, key, a, b)
    assert got[MAX_STEPS]["train_tokens"] == want[MAX_STEPS]["train_tokens"], "token counts continue too"
    assert resumed.metrics["train_tokens"] == ref.metrics["train_tokens"]


def test_sigterm_saves_a_checkpoint_at_the_step_end_and_says_how_to_resume(reference, ft_tiny_model_dir, tmp_path):
    _, _, ref, _ = reference
    config = write_run(tmp_path, ft_tiny_model_dir)
    out = tmp_path / "out"
    paused = PausedRun(tmp_path, config, "step_end:2")
    paused.proc.send_signal(signal.SIGTERM)
    paused.wait_for(lambda: "received SIGTERM" in paused.stderr, "the signal to be handled")
    paused.resume()
    code = paused.finish()

    err = paused.stderr
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM: saving a checkpoint at the end of this step" in err
    assert f"stopped by SIGTERM after step 2 of {MAX_STEPS}; checkpoint saved: {out / 'checkpoint-2'}" in err
    assert f"To resume, run the same command again: ft run {config}" in err
    assert verify(out / "checkpoint-2") == []
    assert not (out / "model.safetensors").exists(), "an interrupted run is not a finished one"

    resumed = run(config)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-2")
    want, got = history(Path(ref.output_dir)), history(out)
    for step in range(3, MAX_STEPS + 1):
        assert abs(want[step]["loss"] - got[step]["loss"]) <= 1e-4 * want[step]["loss"], step


def test_a_second_signal_stops_at_once_without_saving(ft_tiny_model_dir, tmp_path):
    config = write_run(tmp_path, ft_tiny_model_dir, save_steps=None)
    out = tmp_path / "out"
    paused = PausedRun(tmp_path, config, "step_end:2")
    paused.proc.send_signal(signal.SIGINT)
    paused.wait_for(lambda: "received SIGINT" in paused.stderr, "the first signal to be handled")
    paused.proc.send_signal(signal.SIGINT)
    code = paused.finish()
    assert code == -signal.SIGINT, paused.stderr[-3000:]
    assert "received SIGINT again: stopping now, without saving" in paused.stderr
    assert list_checkpoints(out) == []


# -- damaged checkpoints, another config, explicit choice, --fresh, --overwrite ------------------------


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, vault):
    _, _, ref, _ = reference
    config, out = copy_of_run(reference, tmp_path)
    optimizer = out / "checkpoint-8" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64  # same size, other content
    optimizer.write_bytes(bytes(data))
    assert verify(out / "checkpoint-8") == ["optimizer.pt is damaged (its content changed since it was written)"]

    resumed = run(config)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-6")
    assert (out / "damaged-checkpoint-8" / "optimizer.pt").is_file(), "set aside, not deleted"
    assert verify(out / "checkpoint-8") == [], "written again by the resumed run"
    assert abs(resumed.metrics["final_loss"] - ref.metrics["final_loss"]) <= 1e-4 * ref.metrics["final_loss"]


def test_verify_names_what_is_missing_or_truncated(reference, tmp_path, vault):
    _, out = copy_of_run(reference, tmp_path)
    checkpoint = out / "checkpoint-6"
    assert verify(checkpoint) == []
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (checkpoint / "scheduler.pt").unlink()
    problems = verify(checkpoint)
    assert any(p.startswith("model.safetensors has 1000 bytes") for p in problems)
    assert "scheduler.pt is missing" in problems
    (checkpoint / MANIFEST_FILE).unlink()
    assert "it has no ft_checkpoint.json" in verify(checkpoint)[0]


def test_resuming_another_config_is_an_error_naming_the_keys(reference, tmp_path, vault):
    config, out = copy_of_run(reference, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FtError) as err:
        run(config, overrides=["learning_rate=0.002", "seed=7", "logging_steps=2"])
    message = str(err.value)
    assert "holds checkpoints of a run with another config" in message
    assert "learning_rate: 0.001 -> 0.002" in message and "seed: 1 -> 7" in message
    assert "logging_steps" not in message, "keys that do not change the computation may differ"
    assert "--fresh" in message and f"--set output_dir={out}-2" in message
    assert "resume_from_checkpoint: " + str(out / "checkpoint-8") in message
    assert sorted(p.name for p in out.iterdir()) == before, "nothing was touched"


def test_resume_from_checkpoint_picks_one_and_accepts_a_deliberate_change(reference, tmp_path, vault, caplog):
    config, out = copy_of_run(reference, tmp_path)
    with caplog.at_level("WARNING", logger="ft"):
        result = run(config, overrides=[f"resume_from_checkpoint={out / 'checkpoint-3'}", "learning_rate=0.002"])
    assert result.metrics["resumed_from"] == str(out / "checkpoint-3")
    assert "learning_rate: 0.001 -> 0.002" in caplog.text
    assert sorted(history(out)) == list(range(1, MAX_STEPS + 1))


def test_fresh_starts_over_and_removes_the_old_checkpoints(reference, tmp_path, vault):
    config, out = copy_of_run(reference, tmp_path)
    result = run(config, overrides=["max_steps=2", "save_steps=1"], fresh=True)
    assert result.metrics["resumed_from"] is None and result.metrics["steps"] == 2
    assert [c.path.name for c in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


def test_a_finished_run_needs_overwrite_which_starts_it_over(reference, tmp_path, vault):
    from ft.engine.resume import plan_resume
    from ft.kernel.context import load_context

    config, out = copy_of_run(reference, tmp_path, finished=True)
    with pytest.raises(FtError, match="already holds a finished run"):
        plan_resume(load_context(config))
    assert len(list_checkpoints(out)) == 3
    plan_resume(load_context(config), overwrite=True)
    assert list_checkpoints(out) == [], "the old run's checkpoints go with its weights"


# -- data preparation killed midway ------------------------------------------------------------------

KILLED_PREPROCESS = textwrap.dedent('''
    import sys
    import time
    from pathlib import Path

    import datasets

    marker = Path(sys.argv[2])
    save = datasets.Dataset.save_to_disk

    def save_then_hang(self, path, *args, **kwargs):
        save(self, path, *args, **kwargs)
        marker.write_text(path)
        time.sleep(600)

    datasets.Dataset.save_to_disk = save_then_hang
    sys.argv = ["ft", "preprocess", sys.argv[1]]
    from ft.cli import main

    main()
''')


def test_a_data_build_killed_midway_leaves_no_cache_behind(ft_tiny_model_dir, tmp_path):
    from ft.kernel.context import load_context
    from ft.run import preprocess

    config = write_run(tmp_path, ft_tiny_model_dir)
    script, marker = tmp_path / "killed_preprocess.py", tmp_path / "written"
    script.write_text(KILLED_PREPROCESS)
    proc = subprocess.Popen([sys.executable, str(script), str(config), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # hang guard
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()

    prepared = tmp_path / "prepared"
    assert Path(marker.read_text()).is_dir(), "the train split was half-way written when the process died"
    complete = [p for p in prepared.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert complete == [], "a cache directory only appears once it is complete"

    data, _ = preprocess(load_context(config))
    assert len(data.train) == 8 and data.stats["cache"] == "built"
    assert [p.name for p in prepared.iterdir() if p.name.startswith(".tmp")] == [], sorted(os.listdir(prepared))


# -- safe defaults -----------------------------------------------------------------------------------


def test_secrets_never_reach_saved_files_or_logs(reference):
    root, _, _, logs = reference
    secrets = [*SECRETS.values(), *SECRET_PARTS, "sk-signing-0a0a0a", *ENV_SECRETS.values()]
    files = [p for p in (root / "out").rglob("*") if p.is_file()]
    assert any(p.name == "ft_config.yaml" and p.parent.name == "checkpoint-3" for p in files)
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{secret} written to {path}"
    for secret in secrets:
        assert secret not in logs
    saved = yaml.safe_load((root / "out" / "ft_config.yaml").read_text())
    assert saved["vault"]["api_key"] == "***" and saved["vault"]["signing_key"] == "***"
    assert saved["vault"]["github_token"] == "***"
    assert saved["vault"]["mirror"] == "https://mirror-user:***@example.invalid/models"
    assert saved["vault"]["signed_url"] == "https://b.example.invalid/d.jsonl?X-Amz-Date=2026&X-Amz-Signature=***"
    assert saved["vault"]["endpoint"] == "https://api.example.invalid/v1?access_token=***&sig=***"
    assert saved["vault"]["request_header"] == "Authorization: Bearer ***"
    assert "training finished" in logs, "the captured output is the run's"


def test_yaml_is_loaded_safely(tmp_path, ft_tiny_model_dir):
    from ft.kernel.context import load_context
    from ft.kernel.errors import ConfigError

    flag = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"base_model: !!python/object/apply:os.system ['touch {flag}']\n"
                      "datasets: [{path: x.jsonl, type: chat_template}]\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_context(config)
    assert not flag.exists()


def test_remote_code_and_pickled_weights_are_refused_by_default(tmp_path, ft_tiny_model_dir):
    """trust_remote_code is off and only safetensors load, unless the config allows them."""
    import torch
    from transformers import AutoModelForCausalLM

    from ft.kernel.context import load_context

    pickled = tmp_path / "pickled-model"  # the same model with a pickle (.bin) instead of safetensors
    shutil.copytree(ft_tiny_model_dir, pickled)
    torch.save(AutoModelForCausalLM.from_pretrained(ft_tiny_model_dir).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()

    config = write_run(tmp_path, pickled)
    ctx = load_context(config)
    kwargs = ctx.pm.call("ft_model_kwargs", cfg=ctx.cfg)
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    with pytest.raises(FtError, match=r"allow_pickle: true"):
        ctx.pm.call("ft_load_model", cfg=ctx.cfg, kwargs=kwargs, tokenizer=ctx.pm.call("ft_load_tokenizer", cfg=ctx.cfg))

    allowed = load_context(config, overrides=["hf.allow_pickle=true"])
    kwargs = allowed.pm.call("ft_model_kwargs", cfg=allowed.cfg)
    model = allowed.pm.call("ft_load_model", cfg=allowed.cfg, kwargs=kwargs,
                                          tokenizer=allowed.pm.call("ft_load_tokenizer", cfg=allowed.cfg))
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())


def test_no_shell_commands_are_built_anywhere():
    """Launchers pass argument lists, never a shell line that a config value could extend."""
    repo = Path(__file__).resolve().parents[2]
    sources = [*(repo / "src" / "ft").rglob("*.py"), *(repo / "plugins").rglob("*.py")]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text()
        for pattern in ("shell=True", "os.system(", "os.popen(", "yaml.load(", "yaml.unsafe_load", "pickle.load"):
            assert pattern not in text, f"{path.name} uses {pattern}"


def test_resuming_after_the_data_changed_warns(ft_tiny_model_dir, tmp_path, caplog):
    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=4, save_steps=2)
    out = tmp_path / "out"
    run(config)
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "checkpoint-4")
    data = tmp_path / "chat.jsonl"
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])
    with caplog.at_level("WARNING", logger="ft"):
        result = run(config)
    assert result.metrics["resumed_from"] == str(out / "checkpoint-2")
    assert f"the prepared data changed since {out / 'checkpoint-2'} was written" in caplog.text


def test_fresh_and_resume_from_checkpoint_together_are_refused(tmp_path, ft_tiny_model_dir):
    config = write_run(tmp_path, ft_tiny_model_dir, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    with pytest.raises(FtError, match="--fresh starts over, but the config names a checkpoint"):
        run(config, fresh=True)


def test_a_config_error_does_not_print_a_secret(vault, tmp_path, ft_tiny_model_dir):
    from ft.kernel.context import load_context
    from ft.kernel.errors import ConfigError

    config = write_run(tmp_path, ft_tiny_model_dir, vault={"api_key": 31415926535, "hub_token": ["x"]})
    with pytest.raises(ConfigError) as err:
        load_context(config)
    assert "vault.api_key" in str(err.value) and "31415926535" not in str(err.value)


# -- issue 16: the final save, the output-dir lock, a full disk ----------------------------------------


class FailingSave:
    """``ft_before_train`` wraps a save of the trainer so that it fails as a full disk makes it fail."""

    def __init__(self, what: str, at_step: int = 0):
        self.what, self.at_step = what, at_step

    @hookimpl
    def ft_before_train(self, trainer):
        import errno

        if self.what == "tokenizer":  # the final save: a truncated tokenizer.json, then ENOSPC
            tokenizer = trainer.processing_class
            save_tokenizer = tokenizer.save_pretrained

            def save_pretrained(directory, *args, **kwargs):
                if Path(directory).name != ".ft-tmp-final":  # a checkpoint's copy
                    return save_tokenizer(directory, *args, **kwargs)
                (Path(directory) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
                raise OSError(errno.ENOSPC, "No space left on device")

            tokenizer.save_pretrained = save_pretrained
            return
        save_optimizer = trainer._save_optimizer_and_scheduler

        def failing_save(output_dir):  # what torch.save says when the disk fills up under it
            if trainer.state.global_step == self.at_step:
                (Path(output_dir) / "optimizer.pt").write_bytes(b"PK\x03\x04 half an optimizer")
                if self.what == "torch":
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3456 vs 3402")
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.pt"))
            return save_optimizer(output_dir)

        trainer._save_optimizer_and_scheduler = failing_save


def test_disk_full_during_the_final_save_keeps_the_checkpoints_and_the_rerun_resumes(reference, tmp_path, vault):
    """The final outputs are written aside and moved into place when complete: a full disk while the tokenizer
    is written leaves no truncated tokenizer.json, the run is not 'finished', and the rerun resumes from the last
    checkpoint (no --overwrite, which would delete it)."""
    _, _, ref, _ = reference
    config, out = copy_of_run(reference, tmp_path)
    (out / "tokenizer.json").unlink()
    from ft.tools.testing import registered_plugin

    with registered_plugin(FailingSave("tokenizer"), "disk_full"), pytest.raises(FtError) as err:
        run(config)
    message = str(err.value)
    assert "no space left on device" in message and str(out) in message, message
    assert "run the same command again" in message and "checkpoint-8" in message, message
    assert not (out / "tokenizer.json").exists(), "no truncated tokenizer.json in the output dir"
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()
    assert [c.path.name for c in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".ft-tmp")], "the half-written save is gone"

    again = run(config)
    assert again.metrics["resumed_from"] == str(out / "checkpoint-8")
    assert json.loads((out / "tokenizer.json").read_text())["model"], "a whole tokenizer.json"
    assert (out / "metrics.json").is_file() and (out / "model.safetensors").is_file()
    assert abs(again.metrics["final_loss"] - ref.metrics["final_loss"]) <= 1e-4 * ref.metrics["final_loss"]


def test_weights_without_metrics_are_an_unfinished_final_save_that_resumes(reference, tmp_path, vault):
    """Killed while the final files were moved into place: the weights are there, metrics.json (written last)
    is not. That is not a finished run: the rerun resumes from the last checkpoint."""
    config, out = copy_of_run(reference, tmp_path, finished=True)
    (out / "metrics.json").unlink()
    result = run(config)
    assert result.metrics["resumed_from"] == str(out / "checkpoint-8")
    assert (out / "metrics.json").is_file()


def test_the_finished_run_message_says_that_overwrite_deletes_the_checkpoints(reference, tmp_path, vault):
    config, out = copy_of_run(reference, tmp_path, finished=True)
    with pytest.raises(FtError) as err:
        run(config)
    message = str(err.value)
    assert "--overwrite" in message
    assert "deletes its 3 checkpoints (checkpoint-3, checkpoint-6, checkpoint-8)" in message, message
    assert len(list_checkpoints(out)) == 3


@pytest.mark.parametrize("how", ["torch", "oserror"])
def test_disk_full_while_saving_a_checkpoint_says_so_and_keeps_the_earlier_ones(ft_tiny_model_dir, tmp_path, how):
    from ft.tools.testing import registered_plugin

    config = write_run(tmp_path, ft_tiny_model_dir)
    out = tmp_path / "out"
    with registered_plugin(FailingSave(how, at_step=6), "disk_full"), pytest.raises(FtError) as err:
        run(config)
    message = str(err.value)
    assert "no space left on device" in message and str(out) in message, message
    assert "inline_container" not in message
    assert "checkpoint-3" in message and f"ft run {config}" in message, "says how to resume"
    assert [c.path.name for c in list_checkpoints(out)] == ["checkpoint-3"]
    assert verify(out / "checkpoint-3") == []
    assert not (out / ".ft-tmp-checkpoint-6").exists(), "the half-written checkpoint is removed (it frees space)"

    resumed = run(config)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-3")


def test_a_second_run_on_the_same_output_dir_fails_at_once_naming_the_first(ft_tiny_model_dir, tmp_path):
    """The first run is paused in the middle of writing checkpoint-3; the second one must not touch it."""
    import socket

    config = write_run(tmp_path, ft_tiny_model_dir)
    out = tmp_path / "out"
    paused = PausedRun(tmp_path, config, "saving:3")
    try:
        staging = out / ".ft-tmp-checkpoint-3"
        assert staging.is_dir()
        with pytest.raises(FtError) as err:
            run(config)
        message = str(err.value)
        assert f"PID {paused.proc.pid} on {socket.gethostname()}" in message, message
        assert "output_dir" in message and "--set output_dir=" in message
        assert staging.is_dir(), "the first run's checkpoint in progress was left alone"
        paused.resume()
        assert paused.finish() == 0, paused.stderr[-3000:]
    finally:
        if paused.proc.poll() is None:
            paused.proc.kill()
    assert verify(out / "checkpoint-3") == [] and (out / "metrics.json").is_file()


def test_a_lock_left_by_a_dead_process_is_taken_over(ft_tiny_model_dir, tmp_path, caplog):
    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=1, save_steps=None)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / ".ft-run.lock").write_text(json.dumps({"pid": pid, "host": "gone-host", "started": "earlier"}))
    with caplog.at_level("INFO", logger="ft"):
        result = run(config)
    assert result.metrics["steps"] == 1
    assert f"PID {pid} on gone-host" in caplog.text and "taking it over" in caplog.text


def test_when_every_checkpoint_is_damaged_the_run_says_it_starts_over(reference, tmp_path, vault, caplog):
    config, out = copy_of_run(reference, tmp_path)
    for checkpoint in list_checkpoints(out):
        (checkpoint.path / "trainer_state.json").write_text("{}")
    with caplog.at_level("WARNING", logger="ft"):
        result = run(config, overrides=["max_steps=2", "save_steps=1"])
    assert result.metrics["resumed_from"] is None
    assert "every checkpoint in" in caplog.text and "starts over from step 0" in caplog.text, caplog.text
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("damaged-")) == [
        "damaged-checkpoint-3", "damaged-checkpoint-6", "damaged-checkpoint-8"]


def test_a_new_learning_rate_on_resume_is_the_one_training_uses(reference, tmp_path, vault, caplog):
    """resume_from_checkpoint with another learning_rate: the restored schedule is rescaled to it, so the
    learning rate logged (and used) after the resume is the new one, as ft_config.yaml records."""
    _, _, ref, _ = reference
    config, out = copy_of_run(reference, tmp_path)
    with caplog.at_level("WARNING", logger="ft"):
        run(config, overrides=[f"resume_from_checkpoint={out / 'checkpoint-3'}", "learning_rate=0.0005"])
    assert "learning_rate: 0.001 -> 0.0005" in caplog.text
    want, got = history(Path(ref.output_dir)), history(out)
    for step in range(SAVE_STEPS + 1, MAX_STEPS + 1):
        assert got[step]["learning_rate"] == pytest.approx(want[step]["learning_rate"] / 2, rel=1e-6), step
    assert yaml.safe_load((out / "ft_config.yaml").read_text())["learning_rate"] == 0.0005
    assert yaml.safe_load((out / "checkpoint-6" / "ft_config.yaml").read_text())["learning_rate"] == 0.0005


def test_turning_weight_decay_on_when_resuming_is_refused(reference, tmp_path, vault):
    """The restored optimizer groups do not say which parameters decay, so 0 -> 0.01 could not be applied."""
    config, out = copy_of_run(reference, tmp_path)
    with pytest.raises(FtError, match=r"weight_decay cannot be turned on when resuming .*checkpoint-3"):
        run(config, overrides=[f"resume_from_checkpoint={out / 'checkpoint-3'}", "weight_decay=0.01"])


def test_train_loss_after_a_resume_averages_the_whole_run(reference, tmp_path, vault):
    _, _, ref, _ = reference
    config, out = copy_of_run(reference, tmp_path)
    for step in (6, 8):
        shutil.rmtree(out / f"checkpoint-{step}")
    resumed = run(config)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-3")
    assert resumed.metrics["train_loss"] == pytest.approx(ref.metrics["train_loss"], rel=1e-4)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["train_loss"] == pytest.approx(ref.metrics["train_loss"], rel=1e-4)


class Newcomer:
    """A plugin installed after the run started, declaring a section the run's config does not have."""

    class Section(BaseModel):
        model_config = ConfigDict(extra="forbid")
        level: int = 3

    @hookimpl
    def ft_add_config(registry):
        registry.add("newcomer", Newcomer.Section)


def test_installing_a_plugin_with_a_section_does_not_block_resuming(reference, tmp_path, vault):
    from ft.engine.config_diff import config_differences
    from ft.kernel.context import load_context
    from ft.tools.testing import registered_plugin

    config, out = copy_of_run(reference, tmp_path)
    with registered_plugin(Newcomer, "newcomer"):
        assert config_differences(load_context(config), out / "checkpoint-8") == []
        at_defaults = load_context(config, overrides=["newcomer.level=3", "health.watch=true"])
        assert config_differences(at_defaults, out / "checkpoint-8") == [], "a section at its defaults is absent"
        changed = load_context(config, overrides=["newcomer.level=4"])
        assert config_differences(changed, out / "checkpoint-8") == ["newcomer.level: (absent) -> 4"]
        health = load_context(config, overrides=["health.grad_norm_spike=5"])
        assert config_differences(health, out / "checkpoint-8") == [], "health declares it does not change training"
        result = run(config)
    assert result.metrics["resumed_from"] == str(out / "checkpoint-8")


def test_a_checkpoint_with_refused_pickles_is_an_ft_error_not_a_traceback(reference, tmp_path, vault):
    """torch loads checkpoint files with weights_only=True, which refuses arbitrary objects (they could run
    code). A checkpoint holding one (here a datetime in rng_state.pth) ends in an ft error naming it."""
    import datetime

    import torch

    from ft.engine.checkpoints import write_checkpoint_manifest

    config, out = copy_of_run(reference, tmp_path)
    for step in (6, 8):
        shutil.rmtree(out / f"checkpoint-{step}")
    checkpoint = out / "checkpoint-3"
    state = torch.load(checkpoint / "rng_state.pth", weights_only=False)
    torch.save({**state, "saved_at": datetime.datetime(2024, 1, 1)}, checkpoint / "rng_state.pth")
    write_checkpoint_manifest(checkpoint, 3)  # a complete checkpoint, as far as its manifest goes
    with pytest.raises(FtError) as err:
        run(config)
    message = str(err.value)
    assert str(checkpoint) in message and "weights_only" in message and "datetime" in message, message
    assert "resume_from_checkpoint" in message, "says how to go on"


# -- issue 22: an interrupted final save is finished, not trained further --------------------------------


def final_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_ends_at_the_final_checkpoint(out: Path, result, steps: int) -> None:
    """The rerun re-does only the final save: no step beyond max_steps, and the final weights are the
    last checkpoint's (the uninterrupted run's final weights are that checkpoint's)."""
    assert result.metrics["resumed_from"] == str(out / f"checkpoint-{steps}")
    assert result.metrics["steps"] == steps
    assert not (out / f"checkpoint-{steps + 1}").exists(), "trained one step beyond max_steps"
    assert max(history(out)) == steps
    assert_same_weights(final_weights(out), final_weights(out / f"checkpoint-{steps}"))


def test_sigkill_inside_the_final_save_then_resume_only_redoes_the_save(ft_tiny_model_dir, tmp_path):
    """max_steps 7 with 2 steps per epoch ends mid-epoch; the run is killed after the weights of the final save
    are written. The rerun must not train step 8 (it logged 'step 8/7' and wrote checkpoint-8)."""
    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=7)
    out = tmp_path / "out"
    paused = PausedRun(tmp_path, config, "final:0")
    assert (out / "checkpoint-7").is_dir()
    paused.proc.kill()
    assert paused.finish() == -signal.SIGKILL
    assert not (out / "metrics.json").exists()

    result = run(config)
    assert_ends_at_the_final_checkpoint(out, result, 7)


def test_disk_full_in_the_final_save_then_the_rerun_ends_at_max_steps(ft_tiny_model_dir, tmp_path):
    from ft.tools.testing import registered_plugin

    config = write_run(tmp_path, ft_tiny_model_dir, max_steps=7)
    out = tmp_path / "out"
    with registered_plugin(FailingSave("tokenizer"), "disk_full"), pytest.raises(FtError, match="run the same"):
        run(config)
    result = run(config)
    assert_ends_at_the_final_checkpoint(out, result, 7)


# -- issue 22: --overwrite deletes the earlier run only once the new one has saved -----------------------


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (but the lock file) with its content."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".ft-run.lock"}


def test_overwrite_that_fails_before_saving_puts_the_earlier_run_back(reference, tmp_path, vault):
    """The new run fails at data loading: the finished run it was to replace is there as it was, and the next
    run still calls it finished (it said 'the final save of that run did not finish')."""
    config, out = copy_of_run(reference, tmp_path, finished=True)
    before = snapshot(out)
    with pytest.raises(FtError):
        run(config, overrides=[f"datasets.0.path={tmp_path / 'missing.jsonl'}"], overwrite=True)
    assert snapshot(out) == before
    with pytest.raises(FtError, match="already holds a finished run"):
        run(config)


def test_overwrite_deletes_the_earlier_run_once_the_new_one_saved_its_first_checkpoint(reference, tmp_path, vault):
    from transformers import TrainerCallback

    from ft.engine.checkpoints import SET_ASIDE
    from ft.tools.testing import registered_plugin

    config, out = copy_of_run(reference, tmp_path, finished=True)
    seen = []

    class Watch:
        @hookimpl
        def ft_callbacks(cfg):
            class AtEachStep(TrainerCallback):
                def on_step_begin(self, args, state, control, **kwargs):
                    aside = out / SET_ASIDE
                    seen.append((state.global_step, sorted(p.name for p in aside.iterdir()) if aside.is_dir() else []))

            return [AtEachStep()]

    with registered_plugin(Watch, "watch"):
        result = run(config, overrides=["max_steps=3", "save_steps=2"], overwrite=True)
    assert result.metrics["steps"] == 3 and result.metrics["resumed_from"] is None
    assert json.loads((out / "metrics.json").read_text())["summary"]["steps"] == 3, "the new run's"
    assert seen[0] == (0, ["checkpoint-3", "checkpoint-6", "checkpoint-8", "ft_config.yaml", "ft_plugins.json",
                           "metrics.json", "model.safetensors", "training_curves.png"]), seen[0]
    assert seen[1][1] == seen[0][1], "kept until the first checkpoint is written"
    assert seen[2] == (2, []), "deleted once checkpoint-2 is saved"
    assert [c.path.name for c in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert not (out / SET_ASIDE).exists()


def test_a_run_killed_before_saving_after_overwrite_gets_the_earlier_run_back(reference, tmp_path, vault):
    """kill -9 after --overwrite set the earlier run aside and before the new run saved: the next run puts it back."""
    from ft.engine.resume import plan_resume
    from ft.kernel.context import load_context

    config, out = copy_of_run(reference, tmp_path, finished=True)
    before = snapshot(out)
    plan_resume(load_context(config), overwrite=True)  # what the killed run had done
    assert not (out / "metrics.json").exists() and list_checkpoints(out) == []
    with pytest.raises(FtError, match="already holds a finished run"):
        run(config)
    assert snapshot(out) == before
