"""What ft's own tests share beyond ft.tools.testing's fixtures (ft_tiny_model_dir, ft_tiny_tokenizer,
ft_dataset, ft_config, ft_runner, ft_one_torch_thread ..., loaded through the pytest11 entry point):
offline environment defaults, a private command cache, the gpu-marker skip, and two small writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True, scope="session")
def _ft_cache_dir(tmp_path_factory):
    """`ft --help`'s list of plugin commands (ft.commands_cache) goes to a temporary directory, not ~/.cache."""
    before = os.environ.get("FT_CACHE_DIR")
    os.environ["FT_CACHE_DIR"] = str(tmp_path_factory.mktemp("ft-cache"))
    yield
    if before is None:
        os.environ.pop("FT_CACHE_DIR", None)
    else:
        os.environ["FT_CACHE_DIR"] = before


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
def chat_jsonl(ft_dataset) -> Path:
    """32 synthetic chat rows (OpenAI ``messages``) as JSONL."""
    return ft_dataset(n=32, name="chat.jsonl")


@pytest.fixture
def write_yaml(tmp_path):
    """Write a config dict (or text) to a YAML file and return its path."""
    import yaml

    def write(config, name: str = "config.yaml") -> Path:
        p = tmp_path / name
        p.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        return p

    return write
