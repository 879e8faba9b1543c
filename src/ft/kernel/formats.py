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


class TextEncoder:
    """Encodes a batch of texts exactly as ``tokenizer(texts, add_special_tokens=False)`` does.

    Holds a private copy of the fast tokenizer's Rust backend (no truncation, no padding), so
    one call encodes a whole batch without building a ``BatchEncoding``. Picklable.
    """

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
            if hasattr(backend, "encode_special_tokens"):
                backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
            self.tokenizer = None
        else:
            self.tokenizer = tokenizer  # slow tokenizer: ids only
        self.backend = backend

    @property
    def has_offsets(self) -> bool:
        return self.backend is not None

    def encodings(self, texts: list[str]) -> list[Any]:
        """``tokenizers.Encoding`` objects (``.ids``, ``.char_to_token``); fast tokenizers only."""
        if self.backend is None:
            from ft.kernel.errors import FtError

            raise FtError("a fast tokenizer (tokenizer.json) is needed to find chat spans; this one is not fast.")
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def plain_ids(self, text: str) -> list[int]:
        """Ids of ``text`` with special-token text in it tokenized as ordinary text (fast tokenizers)."""
        plain = getattr(self, "_plain", None)
        if plain is None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(self.backend.to_str())
            plain.no_truncation()
            plain.no_padding()
            plain.encode_special_tokens = True
            self._plain = plain
        return plain.encode(text, add_special_tokens=False).ids

    def ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# a base for prompt/completion formats
# ---------------------------------------------------------------------------------------------


class PromptCompletion:
    """Base of prompt/completion formats: write :meth:`prompt_and_completion`, register ``Cls.build``.

    For each row the subclass returns ``(prompt, completion)`` text (or raises :class:`Dropped`);
    the base tokenizes the batch in one call, puts BOS (when the tokenizer has one) before the
    prompt and EOS after the completion, masks the prompt unless ``train_on_inputs`` (the entry's,
    else the config's), never trains BOS, and turns a missing or non-string field read with
    :meth:`text` into a drop that names the field and the row's fields. Instances are picklable.
    """

    def __init__(self, cfg: Any, entry: Any, tokenizer: Any) -> None:
        from ft.kernel.errors import FtError

        if tokenizer.eos_token_id is None:
            raise FtError(f"{entry_where(cfg, entry)}: the tokenizer has no eos_token, which ends each "
                          f"{entry.type} sample; set special_tokens: {{eos_token: ...}}.")
        self.entry = _picklable(entry)
        self.encoder = TextEncoder(tokenizer)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        own = getattr(entry, "train_on_inputs", None)
        self.train_on_inputs = bool(own if own is not None else cfg.train_on_inputs)

    @classmethod
    def build(cls, cfg: Any, entry: Any, tokenizer: Any) -> PromptCompletion:
        """The ``build`` to register: ``register.add("name", Options, MyFormat.build)``."""
        return cls(cfg, entry, tokenizer)

    def prompt_and_completion(self, row: dict[str, Any]) -> tuple[str, str]:
        """``(prompt, completion)`` of one row; raise :class:`Dropped` to drop it."""
        raise NotImplementedError(f"{type(self).__name__} must define prompt_and_completion(row)")

    def text(self, row: dict[str, Any], field: str, *, required: bool = True) -> str:
        """The string in ``row[field]``; a missing (when required) or non-string value drops the row."""
        value = row.get(field)
        if value is None:
            if not required:
                return ""
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise Dropped(f"missing field '{field}'", f"row has fields: {keys}")
        if not isinstance(value, str):
            raise Dropped("malformed row", f"'{field}' is a {type(value).__name__}, not a string")
        return value

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        texts: list[str] = []
        kept: list[int] = []
        for r, row in enumerate(rows):
            try:
                prompt, completion = self.prompt_and_completion(row)
            except Dropped as dropped:
                out[r] = dropped
                continue
            if not prompt.strip() and not completion.strip():
                out[r] = Dropped("empty", "the prompt and the completion are empty")
                continue
            texts += (prompt, completion)
            kept.append(r)
        ids = self.encoder.ids(texts)
        for k, r in enumerate(kept):
            prompt_ids = self.bos + ids[2 * k]
            answer_ids = ids[2 * k + 1] + [self.eos]
            prompt_labels = list(prompt_ids) if self.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
            if self.bos:
                prompt_labels[0] = IGNORE_INDEX  # BOS is never predicted
            out[r] = {"input_ids": prompt_ids + answer_ids, "labels": prompt_labels + answer_ids}
        return out


def _picklable(entry: Any) -> Any:
    """The entry as an instance of its format's own options class (the config's per-type entry
    model is made at run time and cannot be pickled into tokenization workers)."""
    import sys

    for cls in type(entry).__mro__:
        if getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls:
            return cls.model_validate(entry.model_dump()) if cls is not type(entry) else entry
    return entry
