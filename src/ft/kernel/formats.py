"""What a dataset format is: entry options (a pydantic model) and a batched tokenize function.

A format plugin registers ``register.add("my_type", MyOptions, build)`` in
``ft_register_formats``. ``MyOptions`` subclasses :class:`DatasetOptions` and adds the keys
its dataset entries accept; ``build(cfg, entry, tokenizer)`` returns a :class:`Tokenize`
callable that turns a batch of rows into token ids and labels.

Prompt/completion formats subclass :class:`PromptCompletion` and write one method that turns a
row into ``(prompt, completion)`` text; the base does the rest (see docs/writing-a-format-plugin.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field

IGNORE_INDEX = -100


class DatasetOptions(BaseModel):
    """Keys every dataset entry accepts, whatever its format."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Local file or directory, hub dataset id, or fsspec URL (s3://, gs://).")
    type: str = Field(description="Dataset format, registered by a plugin (see `ft plugins`).")
    split: str = Field("train", description="Split to read (hub datasets and directories).")
    name: str | None = Field(None, description="Hub dataset configuration name.")
    data_files: str | list[str] | None = Field(None, description="Files inside a hub dataset or directory.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    ds_type: str | None = Field(
        None, description="File type when it cannot be told from the extension: json, csv, parquet, arrow."
    )
    train_on_inputs: bool | None = Field(
        None, description="Train on prompt tokens too; defaults to the top-level train_on_inputs."
    )
    weight: float | None = Field(
        None, gt=0, description="This dataset's share of the training rows, relative to the other datasets' "
        "weights (1 where unset): rows are sampled, or repeated, to reach it. Unset everywhere: every row once."
    )
    streaming: bool = Field(
        False, description="Read this training dataset as a stream (datasets' IterableDataset): rows are read, "
        "tokenized and packed as training consumes them, nothing is loaded whole or cached. Needs max_steps; "
        "for data larger than memory or disk (pretraining-style text)."
    )


@dataclass
class Drop:
    """One row that was dropped: why, where it came from (``file:line``), and details."""

    reason: str
    where: str
    detail: str = ""


class Dropped(Exception):
    """Raised by a tokenize function for one row: the row is dropped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Note(NamedTuple):
    """Something the data report should count about a row that is kept (``notes`` of a sample)."""

    reason: str
    detail: str = ""


class Tokenize(Protocol):
    """Turns a batch of rows into tokenized samples.

    Receives ``rows`` (a list of dicts) and returns one item per row: either a dict with
    ``input_ids`` and ``labels`` (lists of int of equal length, label -100 = not trained;
    optional extra keys; ``notes``: a list of :class:`Note` the data report counts with the
    row's file:line), a list of such dicts (a row that yields several samples, e.g.
    chunked completion text), or a :class:`Dropped` instance saying why the row was dropped.
    """

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]: ...


# ---------------------------------------------------------------------------------------------
# where an entry is in the config (for messages)
# ---------------------------------------------------------------------------------------------


def entry_where(cfg: Any, entry: Any, key: str | None = None) -> str:
    """``file:line: datasets[i].key`` for an entry of ``cfg.datasets``/``cfg.test_datasets``."""
    for list_name in ("datasets", "test_datasets"):
        for i, e in enumerate(getattr(cfg, list_name, None) or []):
            if e is entry:
                if key is not None and cfg.line_of(list_name, i, key):
                    return cfg.where(list_name, i, key)
                base = cfg.where(list_name, i)
                return f"{base}.{key}" if key else base
    return f"datasets[].{key}" if key else "datasets[]"


# ---------------------------------------------------------------------------------------------
# fast batch encoding
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# a base for prompt/completion formats
# ---------------------------------------------------------------------------------------------


