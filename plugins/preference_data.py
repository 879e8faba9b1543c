"""Preference data: the ``preference`` and ``kto`` dataset types, and the collators of their rows.

Both types render conversations through the chat-template machinery (``ft_plugins.chat_template``)
with SFT's label convention: a completion's content and its end-of-turn token are scored; role
headers, the prompt, and whatever follows the end-of-turn token are not.

``type: preference`` -- a pair per row, the layout detected per row:

- explicit prompt: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (``field_prompt``, or axolotl's
  ``field_messages``, names the prompt's field); the prompt is a list of messages or a text (a user
  message); each side is a list of messages, one message, or a text (an assistant message). A side
  that is the whole conversation (UltraFeedback's ``prompt`` + full ``chosen``/``rejected``) repeats
  the prompt's last messages: they are removed, so the prompt is rendered once; a side that begins
  with another user or system turn is ambiguous and drops the row;
- implicit prompt: ``{"chosen": [conversation], "rejected": [conversation]}`` (the
  UltraFeedback-binarized layout): the messages both sides share are the prompt, the rest of each
  side is its completion;
- ``{"system", "question", "chosen", "rejected"}`` (axolotl's chatml.intel layout).

A row's ``system`` text (``field_system``) goes first in the prompt unless the prompt has a system
message, whichever field the prompt came from.

Rows become ``chosen_input_ids``/``chosen_labels`` and ``rejected_input_ids``/``rejected_labels``.

``type: kto`` -- unpaired rows ``{"prompt", "completion", "label": true|false}`` (``label`` true =
desirable), or ``{"system", "question", "completion", "label"}`` (chatml.intel). A pair in any of
the layouts above is unpaired into two rows (chosen desirable, rejected undesirable). Rows become
``kto_input_ids``/``kto_labels`` and ``label``.

Bad rows are dropped and counted with their ``file:line``: a missing side or prompt, chosen equal
to rejected, an empty completion, a prompt longer than the method's ``max_prompt_len``.

Truncation: a sequence (prompt + one completion) longer than ``sequence_len`` follows
``excess_length``, side by side and the same way for both sides: ``drop`` (the default) drops the
whole pair, ``truncate`` cuts each side to ``sequence_len`` from the end (the prompt is kept, the
completion's tail goes; the core then drops a pair whose sides became identical as "chosen equals
rejected"), ``error`` stops. The prompt itself is never cut: a prompt over ``max_prompt_len`` drops the row.

Other pair methods (``reward_model``) reuse ``PAIR_COLUMNS`` and ``UnitCollator``: that is this
module's API for other plugins.

torch is imported inside functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ft_plugins.chat_template import ChatTemplateOptions, build_chat_tokenize
from pydantic import Field, model_validator

from ft.api import IGNORE_INDEX, Dropped, FtError, entry_where, is_token_column

# Reasons a row is dropped (counted in the drop report).
MISSING_SIDE = "missing side"
MISSING_PROMPT = "missing prompt"
SAME_SIDES = "chosen equals rejected"
EMPTY_COMPLETION = "empty completion"
LONG_PROMPT = "prompt longer than max_prompt_len"
MALFORMED = "malformed row"
PROMPT_IN_COMPLETION = "prompt turn in the completion"

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
KTO_COLUMNS = ("kto_input_ids", "kto_labels", "label")


class PreferenceOptions(ChatTemplateOptions):
    """Dataset-entry options of ``type: preference`` (and ``type: kto``): the chat template's, plus
    the row fields."""

    field_prompt: str = Field("prompt", description="Row field with the prompt: a list of messages or a text.")
    field_chosen: str = Field("chosen", description="Row field with the preferred completion (messages or text).")
    field_rejected: str = Field("rejected", description="Row field with the dispreferred completion.")
    field_system: str = Field("system", description="Row field with a system message, put first when the prompt has "
                              "none (chatml.intel layout).")
    field_question: str = Field("question", description="Row field with the user's question (chatml.intel layout).")
    field_margin: str | None = Field(None, description="method reward_model only: row field with a number, the "
                                     "margin by which chosen must beat rejected (TRL's margin column); unset: none.")
    field_messages: str | None = Field(None, description="axolotl's name for the row field with the prompt's "
                                       "messages: the same as field_prompt (set one of the two).")

    @model_validator(mode="after")
    def _one_prompt_field(self) -> PreferenceOptions:
        if self.field_messages is not None and self.field_prompt not in ("prompt", self.field_messages):
            raise ValueError(f"field_messages ('{self.field_messages}') and field_prompt ('{self.field_prompt}') both "
                             "name the row field with the prompt; set one of them")
        return self

    @property
    def prompt_field(self) -> str:
        """The row field with the prompt (``field_messages``, axolotl's name, when it is set)."""
        return self.field_messages or self.field_prompt


class KtoOptions(PreferenceOptions):
    """Dataset-entry options of ``type: kto``."""

    field_completion: str = Field("completion", description="Row field with the completion (messages or text).")
    field_label: str = Field("label", description="Row field saying whether the completion is desirable (true/false).")


# -- rows -> (prompt messages, completion messages) ---------------------------------------------


def _as_messages(value: Any, name: str, default_role: str) -> list[dict[str, Any]]:
    """A text, one message or a list of messages, as a list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, (list, tuple)):
        if not value:
            raise Dropped(EMPTY_COMPLETION if name != "prompt" else MISSING_PROMPT, f"'{name}' is an empty list")
        if not all(isinstance(m, Mapping) for m in value):
            raise Dropped(MALFORMED, f"'{name}' must be a text or a list of messages")
        return [dict(m) for m in value]
    raise Dropped(MALFORMED, f"'{name}' is a {type(value).__name__}; give a text or a list of messages")


def _missing(row: Mapping[str, Any], field: str) -> bool:
    value = row.get(field)
    return value is None


def _repeated_prompt(prompt: list[dict[str, Any]], completion: list[dict[str, Any]]) -> int:
    """How many of the completion's first messages repeat the prompt's last ones (the completion keeps one)."""
    for k in range(min(len(prompt), len(completion) - 1), 0, -1):
        if all(_same_turn(a, b) for a, b in zip(prompt[-k:], completion[:k], strict=True)):
            return k
    return 0


def _same_turn(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def _shared_prefix(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prompt_of(row: Mapping[str, Any], o: PreferenceOptions) -> list[dict[str, Any]] | None:
    """The prompt messages of a row: its prompt field (``field_prompt``, or axolotl's ``field_messages``), else
    chatml.intel's ``question``; None when it has neither. The row's system text (``field_system``) goes
    first, unless the prompt begins with a system message of its own."""
    if not _missing(row, o.prompt_field):
        prompt = _as_messages(row[o.prompt_field], "prompt", "user")
    elif not _missing(row, o.field_question):  # chatml.intel: system + question
        question = row[o.field_question]
        if not isinstance(question, str):
            raise Dropped(MALFORMED, f"'{o.field_question}' must be a text")
        prompt = [{"role": "user", "content": question}]
    else:
        return None
    system = row.get(o.field_system)
    if isinstance(system, str) and system.strip() and not _is_system(prompt[0], o):
        prompt.insert(0, {"role": "system", "content": system})
    return prompt


def _is_system(message: Mapping[str, Any], o: PreferenceOptions) -> bool:
    role_key = o.message_property_mappings.get("role", "role")
    return "system" in (message.get(role_key), message.get("role"), message.get("from"))


class Pair(NamedTuple):
    """The messages of a pair row: the prompt, each side's completion, and whether the row gave the prompt
    (a prompt field) or it was found as the messages both sides share."""

    prompt: list
    chosen: list
    rejected: list
    given_prompt: bool = True


def split_pair(row: Mapping[str, Any], o: PreferenceOptions) -> Pair:
    """The prompt, chosen and rejected messages of a pair row, whatever its layout."""
    for field in (o.field_chosen, o.field_rejected):
        if _missing(row, field):
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise Dropped(MISSING_SIDE, f"no '{field}' (row has fields: {keys}; datasets[].field_{'chosen' if field == o.field_chosen else 'rejected'} names it)")
    chosen_raw, rejected_raw = row[o.field_chosen], row[o.field_rejected]
    prompt = prompt_of(row, o)
    if prompt is not None:
        return Pair(prompt, _as_messages(chosen_raw, "chosen", "assistant"),
                    _as_messages(rejected_raw, "rejected", "assistant"))
    # implicit prompt: the messages both conversations share
    if isinstance(chosen_raw, str) or isinstance(rejected_raw, str):
        raise Dropped(MISSING_PROMPT, f"no '{o.prompt_field}' and the sides are texts; give a prompt (or whole "
                                   "conversations as chosen/rejected, whose shared messages are the prompt)")
    whole_chosen = _as_messages(chosen_raw, "chosen", "assistant")
    whole_rejected = _as_messages(rejected_raw, "rejected", "assistant")
    n = _shared_prefix(whole_chosen, whole_rejected)
    if n == len(whole_chosen) == len(whole_rejected):
        raise Dropped(SAME_SIDES, "the two conversations are identical")
    if n == 0:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise Dropped(MISSING_PROMPT, f"no '{o.prompt_field}' (row has fields: {keys}), and the two conversations "
                                   "share no first message, so there is no prompt")
    prompt, chosen, rejected = whole_chosen[:n], whole_chosen[n:], whole_rejected[n:]
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side:
            raise Dropped(EMPTY_COMPLETION, f"'{name}' ends where the shared prompt ends: it has no completion")
    return Pair(prompt, chosen, rejected, given_prompt=False)


def split_unpaired(row: Mapping[str, Any], o: KtoOptions) -> list[tuple[list, list, bool, bool]]:
    """``[(prompt, completion, desirable, given_prompt)]`` of a KTO row; a pair row gives two."""
    if _missing(row, o.field_completion) and not _missing(row, o.field_chosen) and not _missing(row, o.field_rejected):
        pair = split_pair(row, o)
        return [(pair.prompt, pair.chosen, True, pair.given_prompt), (pair.prompt, pair.rejected, False, pair.given_prompt)]
    if _missing(row, o.field_completion):
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise Dropped(MISSING_SIDE, f"no '{o.field_completion}' (row has fields: {keys}; datasets[].field_completion "
                                 "names it)")
    prompt = prompt_of(row, o)
    if prompt is None:
        raise Dropped(MISSING_PROMPT, f"no '{o.prompt_field}' (datasets[].field_prompt names it) and no "
                                   f"'{o.field_question}'")
    label = row.get(o.field_label)
    if not isinstance(label, bool):
        raise Dropped(MALFORMED, f"'{o.field_label}' must be true or false, got {label!r}")
    completion = _as_messages(row[o.field_completion], "completion", "assistant")
    return [(prompt, completion, label, True)]


# -- (prompt, completion) -> tokens ---------------------------------------------------------------


class ConversationEncoder:
    """Renders prompt + completion conversations with a chat template and labels the completion.

    Wraps the chat-template machinery (one render per conversation, spans found by alignment): the
    prompt's messages are never scored; the completion's messages are scored by ``roles_to_train``
    and per-message ``training`` flags, with ``train_on_eos``. Picklable.
    """

    def __init__(self, cfg: Any, entry: PreferenceOptions, tokenizer: Any, max_prompt_len: int | None):
        self.chat = build_chat_tokenize(cfg, entry, tokenizer)
        self.chat.field = "messages"  # the conversations handed to the chat machinery, not a row field
        self.max_prompt_len = max_prompt_len

    def completion_check(self, name: str, messages: list[dict[str, Any]]) -> None:
        contents = [m.get(self.chat.content_key) for m in messages]
        if all(isinstance(c, str) and not c.strip() for c in contents):
            raise Dropped(EMPTY_COMPLETION, f"'{name}' has no text")

    def messages(self, prompt: list, completion: list, name: str = "completion",
                 given_prompt: bool = False) -> tuple[list, list[bool]]:
        """The template messages of prompt + completion, and which are scored (the completion's).

        With a prompt the row gave (``given_prompt``), a completion that is a whole conversation repeating
        the prompt's last messages (UltraFeedback's ``prompt`` + full ``chosen``/``rejected``) has them
        removed, so the prompt is rendered once; a completion that still begins with a user or system turn
        is ambiguous, and drops the row.
        """
        try:
            messages, trained = self.chat.messages_of({self.chat.field: [*prompt, *completion]})
        except Exception as exc:  # the chat machinery's own drop (malformed messages ...)
            dropped = getattr(exc, "dropped", None)
            if dropped is None:
                raise
            raise dropped from None
        n_prompt = len(prompt) - (len(prompt) + len(completion) - len(messages))  # drop_system_message
        if given_prompt:
            repeated = _repeated_prompt(messages[:n_prompt], messages[n_prompt:])
            if repeated:
                del messages[n_prompt:n_prompt + repeated], trained[n_prompt:n_prompt + repeated]
            first = messages[n_prompt]["role"] if len(messages) > n_prompt else None
            if first in ("user", "system"):
                raise Dropped(PROMPT_IN_COMPLETION, (
                    f"'{name}' begins with a {first} message although the row has a prompt, which it does not repeat: "
                    "give the completion alone, or whole conversations without a prompt field (their shared "
                    "messages are the prompt)"))
        trained = [False] * n_prompt + trained[n_prompt:]  # the prompt is never scored
        if not any(trained):
            raise Dropped(EMPTY_COMPLETION, f"no message of the completion has a role in roles_to_train "
                                         f"({', '.join(sorted(self.chat.roles_to_train))})")
        return messages, trained

    def encode(self, conversations: Sequence[tuple[list, list[bool]]]) -> list[Any]:
        """``(ids, labels, prompt_tokens)`` per conversation, or a ``Dropped``."""
        texts, spans, out = [], [], []
        for messages, _trained in conversations:
            try:
                text = self.chat.render(messages)
            except Exception as exc:  # jinja raise_exception (roles must alternate ...), bad values
                texts.append(None)
                spans.append(Dropped("template error", f"{type(exc).__name__}: {exc}"))
                continue
            texts.append(text)
            spans.append(self.chat.content_spans(text, messages))
        encodings = iter(self.chat.encoder.encodings([t for t in texts if t is not None]))
        for (messages, trained), text, span in zip(conversations, texts, spans, strict=True):
            if text is None:
                out.append(span)
                continue
            enc = next(encodings)
            ids = enc.ids
            try:
                labels = self.chat.labels(enc, ids, trained, span, messages)
            except Exception as exc:
                dropped = getattr(exc, "dropped", None)
                if dropped is None:
                    raise
                out.append(dropped)
                continue
            first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
            out.append((ids, labels, first))
        return out

    def check_prompt(self, prompt_tokens: int) -> None:
        if self.max_prompt_len is not None and prompt_tokens > self.max_prompt_len:
            raise Dropped(LONG_PROMPT, f"{prompt_tokens} prompt tokens > max_prompt_len {self.max_prompt_len}")


class PairTokenize:
    """``type: preference``: rows -> chosen/rejected token ids and labels (batched, picklable)."""

    def __init__(self, encoder: ConversationEncoder, options: PreferenceOptions):
        self.encoder, self.options = encoder, options

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        pending, conversations, margins = [], [], {}
        for r, row in enumerate(rows):
            try:
                prompt, chosen, rejected, given = split_pair(row, self.options)
                self.encoder.completion_check("chosen", chosen)
                self.encoder.completion_check("rejected", rejected)
                if chosen == rejected:
                    raise Dropped(SAME_SIDES, "the chosen and rejected completions are identical")
                sides = [self.encoder.messages(prompt, chosen, "chosen", given),
                         self.encoder.messages(prompt, rejected, "rejected", given)]
                if sides[0] == sides[1]:  # identical once the repeated prompt is gone
                    raise Dropped(SAME_SIDES, "the chosen and rejected completions are identical")
            except Dropped as dropped:
                out[r] = dropped
                continue
            if self.options.field_margin is not None:
                margin = row.get(self.options.field_margin)
                if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
                    out[r] = Dropped(MALFORMED, f"'{self.options.field_margin}' must be a number (the pair's margin), "
                                                f"got {margin!r}")
                    continue
                margins[r] = float(margin)
            pending.append(r)
            conversations.extend(sides)
        encoded = self.encoder.encode(conversations)
        for k, r in enumerate(pending):
            chosen, rejected = encoded[2 * k], encoded[2 * k + 1]
            try:
                for side in (chosen, rejected):
                    if isinstance(side, Dropped):
                        raise side
                if chosen[0] == rejected[0]:
                    raise Dropped(SAME_SIDES, "chosen and rejected give the same tokens")
                self.encoder.check_prompt(max(chosen[2], rejected[2]))
            except Dropped as dropped:
                out[r] = dropped
                continue
            out[r] = {"chosen_input_ids": chosen[0], "chosen_labels": chosen[1],
                      "rejected_input_ids": rejected[0], "rejected_labels": rejected[1]}
            if r in margins:
                out[r]["margin"] = margins[r]
        return out


class UnpairedTokenize:
    """``type: kto``: rows -> token ids, labels and the desirable flag (batched, picklable)."""

    def __init__(self, encoder: ConversationEncoder, options: KtoOptions):
        self.encoder, self.options = encoder, options

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        pending, conversations = [], []
        for r, row in enumerate(rows):
            try:
                samples = split_unpaired(row, self.options)
                if len(samples) == 2 and samples[0][1] == samples[1][1]:
                    raise Dropped(SAME_SIDES, "the chosen and rejected completions are identical")
                convs = []
                for prompt, completion, _label, given in samples:
                    self.encoder.completion_check("completion", completion)
                    convs.append(self.encoder.messages(prompt, completion, "completion", given))
                if len(convs) == 2 and convs[0] == convs[1]:
                    raise Dropped(SAME_SIDES, "the chosen and rejected completions are identical")
            except Dropped as dropped:
                out[r] = dropped
                continue
            pending.append((r, [label for _p, _c, label, _g in samples], len(conversations)))
            conversations.extend(convs)
        encoded = self.encoder.encode(conversations)
        for r, labels, start in pending:
            samples = []
            try:
                for k, label in enumerate(labels):
                    got = encoded[start + k]
                    if isinstance(got, Dropped):
                        raise got
                    self.encoder.check_prompt(got[2])
                    samples.append({"kto_input_ids": got[0], "kto_labels": got[1], "label": label})
            except Dropped as dropped:
                out[r] = dropped
                continue
            out[r] = samples if len(samples) > 1 else samples[0]
        return out


def _check_entry(cfg: Any, entry: PreferenceOptions) -> None:
    if entry.train_on_inputs:
        raise FtError(f"{entry_where(cfg, entry, 'train_on_inputs')}: preference data is scored on its completions "
                      "only; remove train_on_inputs from this entry (ORPO's NLL term takes the prompt with a top-level "
                      "`train_on_inputs: true`).")
    if entry.field_margin is not None and cfg.method != "reward_model":
        raise FtError(f"{entry_where(cfg, entry, 'field_margin')}: a pair's margin is used by method reward_model "
                      f"only, not {cfg.method}; remove field_margin from this entry.")
    if entry.train_on_eos == "all":
        raise FtError(f"{entry_where(cfg, entry, 'train_on_eos')}: 'all' would score the end-of-turn tokens of the "
                      "prompt; use train_on_eos: turn (the default) or last.")


def _max_prompt_len(cfg: Any) -> int | None:
    section = cfg.section(cfg.method)
    return getattr(section, "max_prompt_len", None)


def build_pairs(cfg: Any, entry: PreferenceOptions, tokenizer: Any) -> PairTokenize:
    _check_entry(cfg, entry)
    return PairTokenize(ConversationEncoder(cfg, entry, tokenizer, _max_prompt_len(cfg)), entry)


def build_unpaired(cfg: Any, entry: KtoOptions, tokenizer: Any) -> UnpairedTokenize:
    _check_entry(cfg, entry)
    return UnpairedTokenize(ConversationEncoder(cfg, entry, tokenizer, _max_prompt_len(cfg)), entry)


# -- collators --------------------------------------------------------------------------------------


class UnitCollator:
    """Rows made of several sequences (a pair: chosen + rejected) -> one padded batch.

    The batch holds every sequence of every row as its own padded row, unit by unit and in the
    order of ``sequences`` (chosen 0, rejected 0, chosen 1, ...), so one forward pass covers them
    all. Besides ``input_ids``, ``labels`` and ``attention_mask`` it carries ``sequence_ids``
    (``[R, T]``: the number of the sequence each token belongs to, -1 on padding; sequence ``s`` is
    the ``s % len(sequences)``-th sequence of unit ``s // len(sequences)``) and each other column
    of the rows as a tensor with one value per unit (KTO's ``label``, precomputed reference
    log-probabilities). This is the same contract the packing plugin's collator keeps for packed
    units, so the method's loss reads both alike.
    """

    def __init__(self, pad_token_id: int, sequences: Sequence[str], pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.sequences = tuple(sequences)
        self.pad_to_multiple_of = pad_to_multiple_of

    def sequences_of(self, rows: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
        return [(r[f"{s}_input_ids"], r[f"{s}_labels"]) for r in rows for s in self.sequences]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = pad_sequences(self.sequences_of(rows), self.pad_token_id, self.pad_to_multiple_of)
        batch.update(unit_extras(rows))
        return batch


def pad_sequences(sequences: list[tuple[Any, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
                  ) -> dict[str, Any]:
    import torch

    from ft.api import pad_rows

    input_ids, labels, lengths = pad_rows([{"input_ids": i, "labels": la} for i, la in sequences], pad_token_id,
                                          pad_to_multiple_of)
    real = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    sequence_ids = torch.where(real, torch.arange(len(sequences))[:, None], torch.full_like(input_ids, -1))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": real.long(), "sequence_ids": sequence_ids}


def unit_extras(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-token columns of the rows, one tensor each (a row's list values are its units')."""
    import torch

    out = {}
    for name in rows[0]:
        if is_token_column(name, positions=True):
            continue
        values: list[Any] = []
        for r in rows:
            value = r[name]
            values.extend(value if isinstance(value, (list, tuple)) else [value])
        out[name] = torch.tensor(values)
    return out


class SharedPromptCollator:
    """Pairs -> one row each, ``[prompt | chosen | rejected]``: the prompt goes through the model once.

    The prompt is what both sides share before their first scored token. Rejected tokens attend to
    the prompt and to earlier rejected tokens, never to the chosen ones, and their positions
    continue from the prompt's end, as if they followed it directly; so every token sees exactly
    what it would see in its own sequence and each side's log-probability is its unshared value.
    The batch carries a 4D additive mask (``[B, 1, L, L]``, in ``mask_dtype``), ``position_ids``,
    ``sequence_ids`` (prompt and chosen: sequence ``2u``, rejected: ``2u + 1``; -1 on padding) and
    ``previous``: where each token's predecessor is (the rejected side's first token follows the
    prompt's last). Padding is a block of its own. For attentions that take a mask (eager, SDPA).
    """

    def __init__(self, pad_token_id: int, mask_dtype: Any = None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.mask_dtype = mask_dtype
        self.pad_to_multiple_of = pad_to_multiple_of

    @staticmethod
    def shared_prompt(chosen: tuple[list, list], rejected: tuple[list, list]) -> int:
        (c_ids, c_labels), (r_ids, r_labels) = chosen, rejected
        limit = min(_first_scored(c_labels), _first_scored(r_labels))
        n = 0
        while n < limit and c_ids[n] == r_ids[n]:
            n += 1
        return n

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        laid = []
        for u, r in enumerate(rows):
            c_ids, c_labels = list(r["chosen_input_ids"]), list(r["chosen_labels"])
            r_ids, r_labels = list(r["rejected_input_ids"]), list(r["rejected_labels"])
            p = self.shared_prompt((c_ids, c_labels), (r_ids, r_labels))
            nc, tail = len(c_ids), len(r_ids) - p
            previous = list(range(-1, nc - 1)) + [p - 1] + list(range(nc, nc + tail - 1))
            laid.append({
                "ids": c_ids + r_ids[p:], "labels": c_labels + r_labels[p:],
                "positions": list(range(nc)) + list(range(p, len(r_ids))),
                "branch": [0] * p + [1] * (nc - p) + [2] * tail,
                "sequence": [2 * u] * nc + [2 * u + 1] * tail,
                "previous": previous[: nc + tail],
            })
        longest = max(len(x["ids"]) for x in laid)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(laid)
        ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((n, longest), dtype=torch.long)
        branch = torch.full((n, longest), 3, dtype=torch.long)  # 3: padding
        sequence = torch.full((n, longest), -1, dtype=torch.long)
        previous = torch.full((n, longest), -1, dtype=torch.long)
        for i, x in enumerate(laid):
            k = len(x["ids"])
            ids[i, :k], labels[i, :k] = torch.tensor(x["ids"]), torch.tensor(x["labels"])
            positions[i, :k], positions[i, k:] = torch.tensor(x["positions"]), torch.arange(longest - k)
            branch[i, :k], sequence[i, :k] = torch.tensor(x["branch"]), torch.tensor(x["sequence"])
            previous[i, :k] = torch.tensor(x["previous"])
        causal = torch.ones((longest, longest), dtype=torch.bool).tril()
        query, key = branch[:, :, None], branch[:, None, :]
        allowed = causal & ((key == query) | ((key == 0) & (query != 3)))
        dtype = self.mask_dtype or torch.float32
        mask = torch.zeros((n, 1, longest, longest), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask,
                 "sequence_ids": sequence, "previous": previous}
        batch.update(unit_extras(rows))
        return batch


def _first_scored(labels: Sequence[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))


class KtoCollator(UnitCollator):
    """KTO rows -> the completions' batch plus the mismatched ``kl_*`` batch of the KL term.

    The KL term is estimated on mismatched pairs built within the micro-batch: row ``i``'s prompt
    with the completion of row ``i - 1`` (rotated by one, as KTO and TRL do), so the mismatched
    outputs are the batch's own completions paired with other prompts. Where row ``i - 1`` has the
    same prompt (the two rows an unpaired pair gives stay together), the nearest earlier row with
    another prompt is taken instead, so no pair is matched. A mismatched sequence longer than
    ``max_len`` is cut to it (its completion's tail goes).
    """

    def __init__(self, pad_token_id: int, max_len: int, pad_to_multiple_of: int | None = None):
        super().__init__(pad_token_id, ("kto",), pad_to_multiple_of)
        self.max_len = max_len

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(rows)
        parts = []
        for r in rows:
            ids, labels = list(r["kto_input_ids"]), list(r["kto_labels"])
            first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
            parts.append((ids[:first], ids[first:], labels[first:]))
        mismatched = []
        for i, (prompt, _ids, _labels) in enumerate(parts):
            j = next((i - k for k in range(1, len(parts)) if parts[i - k][0] != prompt), i - 1)
            _p, ids, labels = parts[j]
            seq_ids = (prompt + ids)[: self.max_len]
            seq_labels = ([IGNORE_INDEX] * len(prompt) + labels)[: self.max_len]
            mismatched.append((seq_ids, seq_labels))
        kl = pad_sequences(mismatched, self.pad_token_id, self.pad_to_multiple_of)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch
