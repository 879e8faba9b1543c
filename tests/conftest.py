"""Shared fixtures: a tiny model + tokenizer made offline once per session, chat data writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Tiny models train many times faster on one intra-op thread, above all on a busy 2-core CI box
    (two threads spin-wait for each other). Tests that train use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama model + ChatML tokenizer (no pad token), made once per test session."""
    from ft.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    from ft.tiny import make_chat_rows, write_jsonl

    return write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(32))


@pytest.fixture
def write_yaml(tmp_path):
    """Write a config dict (or text) to a YAML file and return its path."""
    import yaml

    def write(config, name: str = "config.yaml") -> Path:
        p = tmp_path / name
        p.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        return p

    return write
