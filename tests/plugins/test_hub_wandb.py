"""Tracking and hub settings: the wandb section reaches W&B's integration, the hub section pushes.

The hub tests run against a stand-in hub server this test starts on 127.0.0.1 (HF_ENDPOINT points at
it); nothing leaves the machine.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ft.kernel.context import load_context
from ft.kernel.errors import ConfigError, FtError
from ft.run import run
from ft.tools.tiny import make_chat_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("ft_one_torch_thread")


class StandInHub:
    """Just enough of the Hub's HTTP API for create_repo + create_commit; records what it receives."""

    def __init__(self, fail_commits: bool | str = False) -> None:  # a str: fail the commits whose summary starts so
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.auth: set[str] = set()
        self.fail_commits = fail_commits
        self.failed: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.auth.add(self.headers.get("Authorization", ""))
                base = f"http://{self.headers['Host']}"
                if self.path.startswith("/api/repos/create"):
                    info = json.loads(body)
                    repo = f"{info.get('organization')}/{info['name']}"
                    private = info.get("private")  # older clients send private, newer ones visibility
                    if "visibility" in info:
                        private = {"private": True, "public": False}.get(info["visibility"])
                    hub.repos.setdefault(repo, {"private": private})
                    return self._reply(200, {"url": f"{base}/{repo}"})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    fail = hub.fail_commits
                    if fail is True or (isinstance(fail, str) and header["summary"].startswith(fail)):
                        hub.failed.append(header["summary"])
                        return self._reply(500, {"error": "stand-in failure"})
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                             for x in lines if x["key"] == "file"}
                    repo = self.path.split("/api/models/", 1)[1].split("/commit/", 1)[0]
                    hub.commits.append({"repo": repo, "summary": header["summary"], "files": files})
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{oid}", "commitOid": oid})
                return self._reply(404, {"error": f"not in the stand-in: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def config(ft_tiny_model_dir, tmp_path, **extra):
    data = write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(16))
    return {"base_model": str(ft_tiny_model_dir), "datasets": [{"path": str(data), "type": "chat_template"}],
            "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prepared"),
            "micro_batch_size": 4, "max_steps": 4, "logging_steps": 2, "learning_rate": 1e-3, **extra}


@pytest.fixture
def hub_env(monkeypatch):
    def use(hub: StandInHub) -> None:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    return use


def test_push_at_the_end_and_every_checkpoint(ft_tiny_model_dir, tmp_path, hub_env):
    with StandInHub() as hub:
        hub_env(hub)
        result = run(config(ft_tiny_model_dir, tmp_path, save_steps=2,
                            hub={"model_id": "someone/tiny-chat", "private": True, "strategy": "every_save"}))
    assert hub.repos == {"someone/tiny-chat": {"private": True}}
    assert hub.auth == {"Bearer hf_standin_token"}
    summaries = [c["summary"] for c in hub.commits]
    assert summaries[:2] == ["ft: checkpoint at step 2", "ft: checkpoint at step 4"]
    assert summaries[2].startswith("ft: trained model (4 steps")
    checkpoint = hub.commits[0]["files"]
    assert "last-checkpoint/model.safetensors" in checkpoint and "last-checkpoint/trainer_state.json" in checkpoint
    final = hub.commits[-1]["files"]
    out = tmp_path / "out"
    assert final["model.safetensors"] == (out / "model.safetensors").read_bytes()  # the trained weights, whole
    assert {"config.json", "tokenizer.json", "ft_config.yaml", "metrics.json"} <= set(final)
    assert not any(name.startswith("checkpoint-") for name in final)
    assert result.metrics["steps"] == 4


def test_push_only_at_the_end_by_default(ft_tiny_model_dir, tmp_path, hub_env):
    with StandInHub() as hub:
        hub_env(hub)
        run(config(ft_tiny_model_dir, tmp_path, save_steps=2, hub={"model_id": "someone/tiny-end"}))
    assert len(hub.commits) == 1 and hub.repos["someone/tiny-end"]["private"] is None


def test_a_failed_push_says_the_model_is_safe_and_how_to_push(ft_tiny_model_dir, tmp_path, hub_env):
    with StandInHub(fail_commits=True) as hub:
        hub_env(hub)
        with pytest.raises(FtError, match=r"pushing the trained model to someone/x .* failed.*safe in .*out.*HF_TOKEN"):
            run(config(ft_tiny_model_dir, tmp_path, hub={"model_id": "someone/x"}))
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_failed_checkpoint_push_warns_and_training_goes_on(ft_tiny_model_dir, tmp_path, hub_env, caplog):
    """strategy every_save: a checkpoint that cannot be pushed is a warning (the run is not stopped for it, and
    says what is where); the final model is still pushed."""
    with StandInHub(fail_commits="ft: checkpoint") as hub:
        hub_env(hub)
        with caplog.at_level("WARNING", logger="ft"):
            result = run(config(ft_tiny_model_dir, tmp_path, save_steps=2,
                                hub={"model_id": "someone/flaky", "strategy": "every_save"}))
    assert result.metrics["steps"] == 4
    assert hub.failed == ["ft: checkpoint at step 2", "ft: checkpoint at step 4"]
    assert [c["summary"][:16] for c in hub.commits] == ["ft: trained mode"], "the final model was pushed"
    out = tmp_path / "out"
    assert f"pushing checkpoint 2 to someone/flaky on {hub.url} failed" in caplog.text, caplog.text
    assert "training goes on" in caplog.text and f"{out / 'checkpoint-2'}" in caplog.text
    warnings = json.loads((out / "metrics.json").read_text())["summary"]["warnings"]
    assert [w["check"] for w in warnings] == ["hub_push"] and "checkpoint 2, 4" in warnings[0]["message"], warnings


def test_hub_errors_never_show_the_endpoint_credentials(ft_tiny_model_dir, tmp_path, hub_env, monkeypatch, caplog):
    """HF_ENDPOINT=http://user:secret@host: the failure message names the endpoint without the secret, and says
    the model is safe only once it is (the final push; it fails after the run finished)."""
    with StandInHub(fail_commits=True) as hub:
        hub_env(hub)
        endpoint = hub.url.replace("http://", "http://hubuser:hub-secret-3c3c@")
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with caplog.at_level("INFO"), pytest.raises(FtError) as err:
            run(config(ft_tiny_model_dir, tmp_path, save_steps=2,
                       hub={"model_id": "someone/x", "strategy": "every_save"}))
    message = str(err.value)
    assert len(hub.failed) == 3, hub.failed
    assert "hub-secret-3c3c" not in message and "hub-secret-3c3c" not in caplog.text
    assert "http://hubuser:***@127.0.0.1" in message, message
    assert "pushing the trained model to someone/x" in message and "safe in" in message
    assert (tmp_path / "out" / "metrics.json").is_file(), "the run finished before the final push"


@pytest.mark.parametrize(("hub", "fragment"), [
    ({"private": True}, "hub: set model_id"),
    ({"model_id": "no-owner"}, "'no-owner' is not a repository id; write OWNER/NAME"),
    ({"model_id": "a/b", "strategy": "checkpoint"}, "hub.strategy"),
])
def test_hub_settings_are_checked_at_validation(ft_tiny_model_dir, tmp_path, hub, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_context(config(ft_tiny_model_dir, tmp_path, hub=hub))


# -- wandb ---------------------------------------------------------------------------------------


def test_wandb_section_needs_report_to_wandb(ft_tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"wandb: the wandb section has no effect unless .*report_to: wandb"):
        load_context(config(ft_tiny_model_dir, tmp_path, wandb={"project": "p"}))


def test_wandb_settings_reach_the_integration(ft_tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from transformers.integrations import WandbCallback

    seen = {}

    def setup(self, args, state, model, **kwargs):  # W&B's own setup reads these; record instead of calling out
        seen.update({k: os.environ.get(k) for k in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS", "WANDB_NAME")})
        seen["run_name"] = args.run_name
        self._initialized = True

    monkeypatch.setattr(WandbCallback, "setup", setup)
    monkeypatch.setattr(WandbCallback, "on_log", lambda *a, **k: None)
    monkeypatch.setattr(WandbCallback, "on_train_end", lambda *a, **k: None)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run(config(ft_tiny_model_dir, tmp_path, report_to="wandb",
               wandb={"project": "ft-tests", "entity": "team", "name": "run-1", "tags": ["a", "b"]}))
    assert seen == {"WANDB_PROJECT": "ft-tests", "WANDB_ENTITY": "team", "WANDB_TAGS": "a,b", "WANDB_NAME": "run-1",
                    "run_name": "run-1"}
    assert "WANDB_PROJECT" not in os.environ  # put back after the run


def test_wandb_section_becomes_the_environment_of_the_run_and_is_put_back(ft_tiny_model_dir, tmp_path, monkeypatch):
    from ft_plugins import wandb as plugin

    import ft.kernel.config

    real = ft.kernel.config_checks._importable
    monkeypatch.setattr(ft.kernel.config_checks, "_importable", lambda m: True if m == "wandb" else real(m))
    monkeypatch.setenv("WANDB_PROJECT", "from-the-shell")
    monkeypatch.delenv("WANDB_TAGS", raising=False)
    ctx = load_context(config(ft_tiny_model_dir, tmp_path, report_to=["tensorboard", "wandb"],
                              wandb={"project": "ft-tests", "name": "run-1", "tags": ["a", "b"], "mode": "offline"}))
    assert plugin.ft_trainer_args(ctx.cfg) == {"run_name": "run-1"}
    plugin.ft_before_train(ctx.cfg)
    assert (os.environ["WANDB_PROJECT"], os.environ["WANDB_TAGS"], os.environ["WANDB_MODE"]) == ("ft-tests", "a,b",
                                                                                                  "offline")
    plugin.ft_after_train(ctx.cfg)
    assert os.environ["WANDB_PROJECT"] == "from-the-shell" and "WANDB_TAGS" not in os.environ
