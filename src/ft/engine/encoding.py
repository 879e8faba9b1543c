"""Helpers format plugins tokenize with: ``TextEncoder`` (text to ids, with the tokenizer's special tokens
handled once) and ``PromptCompletion`` (the base of prompt/completion formats)."""

from __future__ import annotations

from typing import Any

from ft.kernel.formats import IGNORE_INDEX, Dropped, entry_where


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
