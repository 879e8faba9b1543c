"""Dataset type `chat_template`: OpenAI-style messages rendered with a chat template.

One render per conversation, no generation markers needed. Shipped templates:
``ft_plugins/templates/*.jinja``: chatml, qwen, llama2, llama3, gemma, phi_3, phi_4, deepseek_v2,
deepseek_v3, mistral (legacy), mistral_v1, mistral_v2v3, mistral_v3_tekken, mistral_v7_tekken. Each
is checked in tests/plugins/test_templates.py against its model family's documented rendering (the Mistral
ones against mistral-common, Mistral's reference implementation). A model family not shipped
here (Qwen3 with its reasoning rules, Llama-3.1 tool calls, Command-R ...) is best trained with the
tokenizer's own template: leave ``chat_template`` unset.

API for third-party chat formats (ShareGPT and the like; see docs/writing-a-format-plugin.md):
subclass :class:`ChatTemplateOptions` to change defaults (``field_messages``, ``roles``,
``message_property_mappings``) and register :func:`build_chat_tokenize` as the format's
builder, importing both from ``ft_plugins.chat_template``. :class:`ChatTokenize` also exposes
``messages_of``/``render``/``labels`` for formats that build on the span machinery.

How spans are found (linear in the number of turns):

1. each conversation is rendered ONCE with the real contents;
2. a *skeleton* render with sentinel contents, cached per role sequence, gives the literal
   template text between contents, so the contents are located in the real render by
   alignment, unambiguously even when a content equals a role name or a header;
3. the rendered texts of the whole batch are tokenized in one fast-tokenizer call (exactly
   what ``tokenizer.apply_chat_template(messages)`` produces), and char spans map to tokens
   through the encodings' ``char_to_token`` (Rust, O(log n)).

Label convention (docs/writing-a-format-plugin.md, "Building on the chat machinery"; preference
formats share it, docs/preference.md): a trained message's content plus the template's end-of-turn
token are trained; the role header and whatever follows the end-of-turn token are not. The
end-of-turn token of a turn is the first special (else added) token after its content, before
the next message's content.

Imports no torch/transformers at module import time.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from typing import Any, Literal

from pydantic import Field

from ft import hookimpl
from ft.api import IGNORE_INDEX, DatasetOptions, Dropped, FtError, Note, Plugin, TextEncoder, entry_where

PLUGIN = Plugin(essential=True)  # essential: always active

__all__ = ["ChatTemplateOptions", "ChatTokenize", "build_chat_tokenize", "resolve_chat_template"]

TrainOnEos = Literal["all", "turn", "last", "none"]

# Template names that mean "the tokenizer's own template" (axolotl spells it tokenizer_default).
TOKENIZER_DEFAULT = ("tokenizer_default", "default")

# Template role -> the names it has in data, unless a dataset's `roles` says otherwise (axolotl's defaults).
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {
    "system": ("system",), "user": ("human", "user"), "assistant": ("gpt", "assistant"), "tool": ("tool",),
}
THINKING_KEY = "reasoning_content"  # what templates that render reasoning read (Qwen3, DeepSeek-R1 ...)
UNKNOWN_ROLE = "unknown role"

# Special tokens each shipped template writes; checked against the tokenizer at build time.
SHIPPED_TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),  # [INST] text + the tokenizer's eos_token
    "mistral_v1": (),  # [INST] is text in the v1 tokenizer
    "mistral_v2v3": ("[INST]", "[/INST]"),
    "mistral_v3_tekken": ("[INST]", "[/INST]"),
    "mistral_v7_tekken": ("[INST]", "[/INST]"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi_3": ("<|user|>", "<|assistant|>", "<|end|>"),
    "phi_4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    "llama2": (),  # bos/eos + [INST] text
    "deepseek_v2": (),  # bos/eos + text
    "deepseek_v3": ("<｜User｜>", "<｜Assistant｜>"),
}

_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
TYPED_SPECIAL = "special token text in a message"  # the data report's name for such rows


class ChatTemplateOptions(DatasetOptions):
    """Dataset-entry options of chat formats (``type: chat_template``)."""

    chat_template: str | None = Field(
        None,
        description="Template: null = the top-level chat_template, else the tokenizer's own; a shipped name "
        "(see `ft_plugins/templates`: chatml, llama3, gemma, phi_3, mistral_v1 ...); a .jinja file; or inline jinja "
        "(text containing '{%' or '{{').",
    )
    field_messages: str = Field(
        "messages", description="Row field holding the list of messages (a row without `messages` but with "
        "ShareGPT's `conversations` uses that)."
    )
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"},
        description="Message property -> field name in the data, e.g. {role: from, content: value}. With the "
        "default, messages written ShareGPT-style ({from, value}) are read as such.",
    )
    roles: dict[str, list[str]] | None = Field(
        None,
        description="Template role -> role names used in the data, e.g. {assistant: [gpt, bot]}. Defaults: "
        "user: [human, user], assistant: [gpt, assistant], system: [system], tool: [tool]; a key given here "
        "replaces that role's default. A row with a role neither names is dropped (counted as 'unknown role').",
    )
    field_system: str | None = Field(
        "system", description="Row field with a system prompt, put first when the messages have no system message."
    )
    drop_system_message: bool = Field(False, description="Leave out the conversation's leading system message.")
    field_tools: str | None = Field(
        "tools", description="Row field with the tool definitions (a list, or its JSON text) handed to the template."
    )
    field_thinking: str | None = Field(
        "reasoning_content", description="Message field with the reasoning trace; it is handed to the template as "
        "`reasoning_content` and trained with the message's content."
    )
    eot_tokens: list[str] | None = Field(
        None, description="Tokens that end a turn (e.g. ['<|eot_id|>', '<|eom_id|>']); default: the first special "
        "token after each message. train_on_eos refers to these."
    )
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"], description="Roles whose message contents are trained."
    )
    train_on_eos: TrainOnEos = Field(
        "turn",
        description="Which end-of-turn tokens are trained: turn = after each trained message, all = after "
        "every message, last = after the last trained message only, none = never.",
    )
    message_field_training: str | None = Field(
        "training",
        description="Per-message boolean field that forces a message to be trained (true) or not (false), "
        "whatever its role.",
    )
    escape_special_tokens: bool = Field(
        False,
        description="Special-token text typed inside a message (e.g. '<|im_end|>') is tokenized as ordinary text "
        "instead of becoming that control token. Either way such rows are counted in the data report.",
    )
    max_render_seconds: float | None = Field(
        5.0, gt=0,
        description="CPU seconds one conversation may take to render; a slower one is dropped ('template too "
        "slow'), and a template too slow for most rows is an error, so a looping template (one shipped with a "
        "downloaded tokenizer, say) cannot hang preprocessing. null: no limit.",
    )


# ---------------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------------


def _templates_dir() -> Any:
    return resources.files("ft_plugins").joinpath("templates")


def shipped_template_names() -> list[str]:
    """Names of the templates shipped in ``ft_plugins/templates/*.jinja``."""
    try:
        return sorted(p.name[: -len(".jinja")] for p in _templates_dir().iterdir() if p.name.endswith(".jinja"))
    except (FileNotFoundError, ModuleNotFoundError):
        return []


def load_shipped_template(name: str) -> str:
    return _templates_dir().joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def is_inline_template(value: str) -> bool:
    return "{%" in value or "{{" in value


def resolve_chat_template(spec: str | None, tokenizer: Any, where: str, cfg: Any = None) -> str:
    """The jinja source a dataset entry asks for; FtError with the fix when there is none."""
    shipped = shipped_template_names()
    names = ", ".join(shipped)
    if spec is None or spec in TOKENIZER_DEFAULT:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            name = getattr(tokenizer, "name_or_path", "") or "the model"
            raise FtError(
                f"{where}: the tokenizer of {name} has no chat template. Set `chat_template: chatml` on the "
                f"dataset entry (or another shipped name: {names}), or give inline jinja."
            )
        return own
    if is_inline_template(spec):
        return spec
    if spec in shipped:
        _check_template_tokens(spec, tokenizer, where)
        return load_shipped_template(spec)
    if spec.endswith((".jinja", ".j2")):
        from pathlib import Path

        path = Path(spec)
        if cfg is not None and not path.exists():
            from ft.api import resolve_path

            path = Path(resolve_path(cfg, spec))
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FtError(f"{where}: cannot read chat template file {spec!r}: {exc.strerror or exc}.") from None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict) and spec in own:  # a named template of the tokenizer (e.g. tool_use)
        return own[spec]
    close = difflib.get_close_matches(spec, shipped, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise FtError(
        f"{where}: unknown chat template '{spec}'.{hint} Shipped templates: {names}. Leave it unset to use the "
        "tokenizer's own, give a .jinja file, or inline jinja."
    )


def _check_template_tokens(name: str, tokenizer: Any, where: str) -> None:
    needed = SHIPPED_TEMPLATE_TOKENS.get(name, ())
    if not needed:
        return
    try:
        vocab = tokenizer.get_added_vocab()
    except Exception:  # a tokenizer without added-token bookkeeping: let the span check speak
        return
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise FtError(
            f"{where}: template '{name}' writes the special token(s) {', '.join(missing)}, which the tokenizer "
            f"does not have, so turns could not end. Use the template made for this model (leave "
            f"chat_template unset for the tokenizer's own), or add the tokens: special_tokens / tokens: "
            f"{list(missing)}."
        )


def compile_template(source: str) -> Any:
    """Compile jinja the way transformers does (same sandbox, filters and extensions)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(source)
    except ImportError:  # pragma: no cover - older/newer transformers without the helper
        import json

        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals["raise_exception"] = raise_exception
        source = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source)
        return env.from_string(source)


# ---------------------------------------------------------------------------------------------
# the tokenize callable
# ---------------------------------------------------------------------------------------------


class _RenderTimeout(BaseException):
    """Raised inside a render that ran out of time (a BaseException: templates and `except Exception` keep out)."""


def _on_render_alarm(signum: int, frame: Any) -> None:
    raise _RenderTimeout


@contextlib.contextmanager
def render_time_limit(seconds: float | None) -> Iterator[bool]:
    """While inside: a render that uses more than ``seconds`` of CPU raises ``_RenderTimeout``. Yields
    whether renders are bounded.

    A CPU-time interval timer (``ITIMER_VIRTUAL``, so a busy machine does not shorten the limit) whose
    signal handler raises in the rendering thread. Only where there are interval timers and in the main
    thread (data workers are); elsewhere renders are not bounded. The handler is installed once around a
    batch; arming the timer costs two system calls per conversation.
    """
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.signal(signal.SIGVTALRM, _on_render_alarm)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


class _Skip(Exception):
    """One row cannot be used: carries the Dropped to return for it."""

    def __init__(self, dropped: Dropped):
        self.dropped = dropped


class ChatTokenize:
    """Batched chat tokenization with labels (picklable; see the module docstring)."""

    _MAX_SKELETONS = 4096

    def __init__(self, tokenizer: Any, template: str, options: ChatTemplateOptions, *, train_on_inputs: bool,
                 where: str):
        self.encoder = TextEncoder(tokenizer)
        if not self.encoder.has_offsets:
            raise FtError(f"{where}: chat_template needs a fast tokenizer (with tokenizer.json) to find spans.")
        self.template = template
        self.template_kwargs = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes
        added = tokenizer.added_tokens_decoder  # id -> AddedToken
        self.special_ids = frozenset(i for i, t in added.items() if getattr(t, "special", False))
        self.added_ids = frozenset(added) - self.special_ids
        self.eot_ids = _token_ids(tokenizer, options.eot_tokens, where) if options.eot_tokens else frozenset()
        texts = sorted({added[i].content for i in self.special_ids if added[i].content}, key=len, reverse=True)
        self.special_text = re.compile("|".join(map(re.escape, texts))) if texts else None
        self.escape_special = options.escape_special_tokens
        self.field = options.field_messages
        mapping = {"role": "role", "content": "content", **options.message_property_mappings}
        self.role_key, self.content_key = mapping.pop("role"), mapping.pop("content")
        self.thinking_key = options.field_thinking
        if self.thinking_key and self.thinking_key != THINKING_KEY and THINKING_KEY not in mapping:
            mapping[THINKING_KEY] = self.thinking_key
        self.extra_mapping = mapping  # other template property -> data field
        self.training_key = options.message_field_training
        self.consumed = {self.role_key, self.content_key, *mapping.values()}
        if self.training_key:
            self.consumed.add(self.training_key)
        # ShareGPT rows ({from, value}) are read as such when the mapping is the default one
        self.sharegpt = (self.role_key, self.content_key) == ("role", "content")
        self.consumed_sharegpt = (self.consumed - {"role", "content"}) | {"from", "value"}
        roles = {**{k: list(v) for k, v in DEFAULT_ROLES.items()}, **(options.roles or {})}
        self.role_map = {src: dst for dst, srcs in roles.items() for src in srcs}
        self.known_roles = frozenset(self.role_map) | frozenset(roles)
        for dst in roles:  # a template role is itself unless a data name says otherwise
            self.role_map.setdefault(dst, dst)
        # roles a {role, content} message can keep as they are (the fast path)
        self.plain_roles = frozenset(r for r, dst in self.role_map.items() if r == dst)
        self.passthrough = self.sharegpt and not self.extra_mapping
        self.roles_to_train = frozenset(options.roles_to_train)
        self.field_system = options.field_system
        self.drop_system = options.drop_system_message
        self.field_tools = options.field_tools
        self.train_on_eos = options.train_on_eos
        self.train_on_inputs = train_on_inputs
        self.where = where
        self.max_render_seconds = options.max_render_seconds
        self._timed = False  # inside render_time_limit: arm the timer per render
        self._rendered = 0
        self._too_slow = 0
        self._compiled: Any = None
        self._skeletons: dict[Any, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None
        state["_skeletons"] = {}
        state["_timed"] = False
        return state

    # -- rendering ---------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> str:
        if self._compiled is None:
            self._compiled = compile_template(self.template)
        if not self._timed:
            return self._compiled.render(messages=messages, tools=tools, documents=None, add_generation_prompt=False,
                                         **self.template_kwargs)
        signal.setitimer(signal.ITIMER_VIRTUAL, self.max_render_seconds)
        try:
            return self._compiled.render(messages=messages, tools=tools, documents=None, add_generation_prompt=False,
                                         **self.template_kwargs)
        finally:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)

    @contextlib.contextmanager
    def _time_limit(self) -> Iterator[None]:
        if self._timed:  # already inside one
            yield
            return
        with render_time_limit(self.max_render_seconds) as bounded:
            self._timed = bounded
            try:
                yield
            finally:
                self._timed = False

    def _too_slow_row(self) -> Dropped:
        """A row whose render ran out of time; an error once most rows do."""
        self._too_slow += 1
        if self._too_slow >= 3 and self._too_slow * 2 > self._rendered + self._too_slow:
            raise FtError(
                f"{self.where}: the chat template took more than {self.max_render_seconds:g} s of CPU to render "
                f"{self._too_slow} of the {self._rendered + self._too_slow} conversations tried so far. It loops too "
                "long (check its loops; a template that came with a downloaded tokenizer may do this): use another "
                "chat_template, or raise max_render_seconds on this dataset entry if conversations are that long."
            )
        return Dropped("template too slow", f"rendering took more than {self.max_render_seconds:g} s of CPU "
                                            "(max_render_seconds); a loop in the chat template?")

    def _skeleton(self, messages: list[dict[str, Any]], tools: list[Any] | None = None
                  ) -> tuple[list[str], list[int]] | None:
        """Literal template text around each text piece (sentinel render), cached per role sequence."""
        key = tuple(m["role"] if len(m) == 2 else (m["role"], *sorted(m)) for m in messages)
        if tools:
            import json

            key = (key, json.dumps(tools, sort_keys=True, default=str))
        hit = self._skeletons.get(key, False)
        if hit is not False:
            return hit
        sentinel = []
        n = len(messages)
        for i, m in enumerate(messages):
            m = {**m, "content": f"\ue000{i}\ue001"}
            if isinstance(m.get(THINKING_KEY), str):
                m[THINKING_KEY] = f"\ue000{n + i}\ue001"
            sentinel.append(m)
        try:
            text = self.render(sentinel, tools) if tools else self.render(sentinel)
        except Exception:
            result = None
        else:
            parts = _SENTINEL_RE.split(text)
            order = [int(x) for x in parts[1::2]]
            result = (parts[0::2], order) if len(set(order)) == len(order) else None
        if len(self._skeletons) >= self._MAX_SKELETONS:
            self._skeletons.clear()
        self._skeletons[key] = result
        return result

    def probe(self) -> None:
        """Fail fast (before any worker starts) when trained turns would have no end-of-turn token."""
        if self.train_on_inputs or self.train_on_eos == "none":
            return
        messages = [{"role": "user", "content": "Hello there?"}, {"role": "assistant", "content": "Hi, how can I help?"}]
        trained = [m["role"] in self.roles_to_train for m in messages]
        if not any(trained):
            return
        try:
            with self._time_limit():
                text = self.render(messages)
                spans = self.content_spans(text, messages)
            (enc,) = self.encoder.encodings([text])
        except _RenderTimeout:
            raise FtError(f"{self.where}: the chat template did not finish rendering a two-message conversation "
                          f"within {self.max_render_seconds:g} s of CPU (max_render_seconds): it loops too long. Use "
                          "another chat_template (a template that came with a downloaded tokenizer may do this).") \
                from None
        except Exception:  # a template that needs other roles: the rows themselves will tell
            return
        try:
            self.labels(enc, enc.ids, trained, spans, messages)
        except _Skip:
            return

    # -- rows -> messages --------------------------------------------------------------------

    def messages_of(self, row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[bool]]:
        """Template messages of a row and whether each is trained; raises _Skip for bad rows.

        Roles are mapped to the template's (``roles``, ShareGPT's human/gpt by default); a message
        whose role is not known drops the row (a conversation with a turn cut out, or an odd role
        header rendered into the text, would train the wrong thing).
        """
        raw = row.get(self.field)
        if raw is None and self.field == "messages" and row.get("conversations") is not None:
            raw = row["conversations"]  # ShareGPT's field name
        if raw is None:
            keys = ", ".join(sorted(map(str, row))) or "none"
            raise _Skip(Dropped(f"missing field '{self.field}'",
                                f"row has fields: {keys}; set datasets[].field_messages to the right one"))
        if isinstance(raw, str):
            raw = _json_list(raw, f"'{self.field}'")
        if not isinstance(raw, (list, tuple)):
            raise _Skip(Dropped("malformed messages", f"'{self.field}' is a {type(raw).__name__}, not a list"))
        if not raw:
            raise _Skip(Dropped("empty", f"'{self.field}' has no messages"))
        messages, trained = [], []
        rk, ck, tk = self.role_key, self.content_key, self.training_key
        passthrough, plain = self.passthrough, self.plain_roles
        to_train = self.roles_to_train
        for i, m in enumerate(raw):
            if type(m) is not dict and not isinstance(m, Mapping):
                raise _Skip(Dropped("malformed messages", f"message {i} is a {type(m).__name__}, not a mapping"))
            role, content = m.get(rk), m.get(ck)
            consumed = self.consumed
            if role is None and self.sharegpt and "from" in m:  # ShareGPT style: {from, value}
                role, content, consumed = m.get("from"), m.get("value"), self.consumed_sharegpt
            elif passthrough and len(m) == 2 and role in plain and type(content) is str:
                messages.append(m)  # already a template message: {role, content}
                trained.append(role in to_train)
                continue
            if type(role) is not str or type(content) is not str:
                self._bad_message(i, role, content, consumed is self.consumed_sharegpt)
            mapped = self.role_map.get(role)
            if mapped is None:
                raise _Skip(self._unknown_role(i, role))
            msg = {"role": mapped, "content": content}
            if len(m) > 2 or self.extra_mapping:
                for k, v in m.items():
                    if k not in consumed and v is not None:
                        msg[k] = v
                for prop, src in self.extra_mapping.items():
                    if m.get(src) is not None:
                        msg[prop] = m[src]
            flag = m.get(tk) if tk else None
            if flag is None:
                train = mapped in to_train or role in to_train
            elif isinstance(flag, bool):
                train = flag
            else:
                raise _Skip(Dropped("malformed messages", f"message {i}: '{tk}' must be true or false, got {flag!r}"))
            messages.append(msg)
            trained.append(train)
        if self.field_system and messages[0]["role"] != "system":
            system = row.get(self.field_system)
            if isinstance(system, str) and system:
                messages.insert(0, {"role": "system", "content": system})
                trained.insert(0, "system" in to_train)
        if self.drop_system and messages[0]["role"] == "system":
            messages, trained = messages[1:], trained[1:]
            if not messages:
                raise _Skip(Dropped("empty", "only a system message, and drop_system_message is set"))
        return messages, trained

    def tools_of(self, row: Mapping[str, Any]) -> list[Any] | None:
        """The row's tool definitions for the template (``field_tools``), or None."""
        tools = row.get(self.field_tools) if self.field_tools else None
        if tools is None:
            return None
        if isinstance(tools, str):
            tools = _json_list(tools, f"'{self.field_tools}'")
        if not isinstance(tools, (list, tuple)):
            raise _Skip(Dropped("malformed tools", f"'{self.field_tools}' is a {type(tools).__name__}, not a list"))
        return list(tools) or None

    def _unknown_role(self, i: int, role: str) -> Dropped:
        known = ", ".join(sorted(self.known_roles))
        return Dropped(UNKNOWN_ROLE, f"message {i} has role '{role}' (known: {known}); map it with datasets[].roles, "
                                     f"e.g. roles: {{assistant: [gpt, {role}]}}")

    def _bad_message(self, i: int, role: Any, content: Any, sharegpt: bool = False) -> None:
        rk, ck = ("from", "value") if sharegpt else (self.role_key, self.content_key)
        if not isinstance(role, str):
            raise _Skip(Dropped("malformed messages", f"message {i} has no string field '{rk}'"))
        if not isinstance(content, str):
            what = "no field" if content is None else f"a {type(content).__name__} in field"
            raise _Skip(Dropped("malformed messages", f"message {i} has {what} '{ck}' (needs a string)"))

    # -- spans -------------------------------------------------------------------------------

    def content_spans(self, text: str, messages: list[dict[str, Any]], tools: list[Any] | None = None
                      ) -> list[tuple[int, int] | None]:
        """Char span of each message's text in ``text`` (None where the template omits it): its content,
        and its reasoning trace when it has one (from the reasoning's start to the content's end)."""
        pieces = _pieces(messages)
        skeleton = self._skeleton(messages, tools)
        spans = _align(text, skeleton, pieces) if skeleton is not None else None
        if spans is None:
            spans = _search(text, pieces, len(messages))
        if len(pieces) == len(messages):
            return spans
        out = list(spans[:len(messages)])
        for i in range(len(messages)):
            extra = spans[len(messages) + i] if len(messages) + i < len(spans) else None
            if extra is not None:
                own = out[i]
                out[i] = extra if own is None else (min(own[0], extra[0]), max(own[1], extra[1]))
        return out

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(rows)
        texts, pending = [], []
        with self._time_limit():
            for r, row in enumerate(rows):
                try:
                    messages, trained = self.messages_of(row)
                    tools = self.tools_of(row) if self.field_tools and self.field_tools in row else None
                    try:
                        text = self.render(messages, tools) if tools else self.render(messages)
                    except Exception as exc:  # jinja raise_exception (e.g. roles must alternate), bad values
                        raise _Skip(Dropped("template error", f"{type(exc).__name__}: {exc}")) from None
                    spans = None if self.train_on_inputs else self.content_spans(text, messages, tools)
                except _Skip as skip:
                    out[r] = skip.dropped
                    continue
                except _RenderTimeout:
                    out[r] = self._too_slow_row()
                    continue
                self._rendered += 1
                texts.append(text)
                pending.append((r, trained, spans, messages, tools))
        encodings = self.encoder.encodings(texts) if texts else []
        for (r, trained, spans, messages, tools), enc, text in zip(pending, encodings, texts, strict=True):
            ids = enc.ids
            try:
                labels = list(ids) if self.train_on_inputs else self.labels(enc, ids, trained, spans, messages)
            except _Skip as skip:
                out[r] = skip.dropped
                continue
            sample = {"input_ids": ids, "labels": labels}
            typed = self._typed_special_tokens(messages)
            if typed:
                sample["notes"] = [Note(TYPED_SPECIAL, f"message {i} contains '{token}', " + (
                    "tokenized as text (escape_special_tokens)" if self.escape_special else
                    "which becomes that control token; escape_special_tokens: true on the dataset entry "
                    "tokenizes it as text")) for i, token in typed]
                if self.escape_special:
                    if spans is None:
                        with self._time_limit():
                            spans = self.content_spans(text, messages, tools)
                    sample["input_ids"], sample["labels"] = self._escaped(enc, ids, labels, text, spans)
            out[r] = sample
        return out

    def _typed_special_tokens(self, messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
        """(message index, first special-token text) of each message whose content contains one."""
        if self.special_text is None:
            return []
        search = self.special_text.search
        return [(i, found.group()) for i, m in enumerate(messages) if (found := search(m["content"]))]

    def _escaped(self, enc: Any, ids: list[int], labels: list[int], text: str,
                 spans: list[tuple[int, int] | None]) -> tuple[list[int], list[int]]:
        """``ids``/``labels`` with each special token that lies inside a message's content re-tokenized as
        text (its pieces trained where the token was)."""
        contents = [s for s in spans if s is not None]
        out_ids: list[int] = []
        out_labels: list[int] = []
        for j, token in enumerate(ids):
            if token in self.special_ids:
                a, b = enc.offsets[j]
                if any(start <= a and b <= end for start, end in contents):
                    plain = self.encoder.plain_ids(text[a:b])
                    out_ids.extend(plain)
                    out_labels.extend(plain if labels[j] != IGNORE_INDEX else [IGNORE_INDEX] * len(plain))
                    continue
            out_ids.append(token)
            out_labels.append(labels[j])
        return out_ids, out_labels

    def labels(self, enc: Any, ids: list[int], trained: list[bool], spans: list[tuple[int, int] | None],
               messages: list[dict[str, Any]]) -> list[int]:
        n = len(ids)
        labels = [IGNORE_INDEX] * n
        # token ranges of the contents, in text order
        located = sorted((s[0], s[1], i) for i, s in enumerate(spans) if s is not None)
        for i, (s, t) in enumerate(zip(spans, trained, strict=True)):
            if s is None and t:
                raise _Skip(Dropped("template error",
                                    f"message {i} ({messages[i]['role']}) is trained but the template does not "
                                    "render its content"))
        ranges = [(_token_range(enc, a, b, n), i) for a, b, i in located]
        last_trained = max((i for i, t in enumerate(trained) if t and spans[i] is not None), default=-1)
        mode = self.train_on_eos
        special, added, eot_ids = self.special_ids, self.added_ids, self.eot_ids
        for k, ((ts, te), i) in enumerate(ranges):
            train = trained[i]
            want_eos = mode == "all" or (train and mode == "turn") or (mode == "last" and i == last_trained)
            eot = None
            if want_eos:
                stop = ranges[k + 1][0][0] if k + 1 < len(ranges) else n
                if eot_ids:
                    eot = next((j for j in range(te, stop) if ids[j] in eot_ids), None)
                else:
                    eot = next((j for j in range(te, stop) if ids[j] in special), None)
                    if eot is None:
                        eot = next((j for j in range(te, stop) if ids[j] in added), None)
                if eot is None and train:
                    which = "none of eot_tokens" if eot_ids else "no end-of-turn token (a special token)"
                    raise FtError(
                        f"{self.where}: train_on_eos is '{mode}' but the chat template puts {which} after the "
                        f"content of a trained '{messages[i]['role']}' message, so the model could not learn to "
                        "stop. Use a template that ends turns with a special token (e.g. chatml), list the tokens "
                        "that end its turns in eot_tokens, or set train_on_eos: none."
                    )
            if train:
                end = eot + 1 if eot is not None else te
                labels[ts:end] = ids[ts:end]
            elif eot is not None:
                labels[eot] = ids[eot]
        return labels


def _pieces(messages: list[dict[str, Any]]) -> list[str | None]:
    """The texts the template renders per message: every content, then every reasoning trace (None
    where a message has none), so piece ``i`` is message i's content and ``n + i`` its reasoning."""
    pieces: list[str | None] = [m["content"] for m in messages]
    if any(isinstance(m.get(THINKING_KEY), str) for m in messages):
        pieces += [m[THINKING_KEY] if isinstance(m.get(THINKING_KEY), str) else None for m in messages]
    return pieces


def _json_list(text: str, what: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError as exc:
        raise _Skip(Dropped("malformed messages", f"{what} is text that is not JSON: {exc}")) from None


def _token_ids(tokenizer: Any, tokens: Sequence[str], where: str) -> frozenset[int]:
    """Ids of ``eot_tokens``; each must be one token of the vocabulary."""
    ids = []
    for token in tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise FtError(f"{where}: eot_tokens: '{token}' is not a token of this tokenizer, so no turn could end with "
                          f"it. Use the template's own end-of-turn token, or add it: tokens: ['{token}'].")
        ids.append(tid)
    return frozenset(ids)


def _token_range(enc: Any, a: int, b: int, n: int) -> tuple[int, int]:
    """Tokens overlapping chars [a, b) (like transformers' assistant mask), as [start, end)."""
    if a >= b:
        t = _token_at_or_after(enc, a, n)
        return t, t
    first = None
    for p in range(a, b):
        first = enc.char_to_token(p)
        if first is not None:
            break
    if first is None:  # only chars no token covers (stripped whitespace)
        t = _token_at_or_after(enc, b, n)
        return t, t
    last = None
    for p in range(b - 1, a - 1, -1):
        last = enc.char_to_token(p)
        if last is not None:
            break
    return first, last + 1


def _token_at_or_after(enc: Any, pos: int, n: int) -> int:
    # bounded scan: stripped whitespace between tokens is short
    for p in range(pos, pos + 64):
        t = enc.char_to_token(p)
        if t is not None:
            return t
    return n


def _candidates(content: str) -> list[str]:
    out = [content]
    for c in (content.strip(), content.rstrip(), content.lstrip()):
        if c not in out:
            out.append(c)
    return out


def _align(text: str, skeleton: tuple[list[str], list[int]], pieces: list[str | None]
           ) -> list[tuple[int, int] | None] | None:
    """Spans by walking the skeleton's literals through the real render; None if it does not fit."""
    literals, order = skeleton
    if not text.startswith(literals[0]) or any(i >= len(pieces) or pieces[i] is None for i in order):
        return None
    spans: list[tuple[int, int] | None] = [None] * len(pieces)
    pos = len(literals[0])
    last = len(order) - 1
    for k, i in enumerate(order):
        nxt = literals[k + 1]
        end = None
        content = pieces[i]
        q = pos + len(content)
        if text.startswith(content, pos) and text.startswith(nxt, q) and (k < last or q + len(nxt) == len(text)):
            spans[i] = (pos, q)
            pos = q + len(nxt)
            continue
        for cand in _candidates(content)[1:]:
            q = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(nxt, q) and (k < last or q + len(nxt) == len(text)):
                end = q
                break
        if end is None:  # the template transformed the content: it ends where the next literal starts
            if not nxt:
                if k < last:
                    return None
                end = len(text)
            else:
                end = text.rfind(nxt) if k == last else text.find(nxt, pos)
            if end < pos:
                return None
        spans[i] = (pos, end)
        pos = end + len(nxt)
    return spans if pos == len(text) else None


def _search(text: str, pieces: list[str | None], n_messages: int) -> list[tuple[int, int] | None]:
    """Fallback: find each message's reasoning (if any) and content in order (templates whose literal
    text depends on values)."""
    spans: list[tuple[int, int] | None] = [None] * len(pieces)
    pos = 0
    for i in range(n_messages):
        own = [n_messages + i, i] if len(pieces) > n_messages else [i]
        for p in own:
            if pieces[p] is None:
                continue
            found = None
            for cand in _candidates(pieces[p]):
                q = text.find(cand, pos)
                if q >= 0 and (found is None or q < found[0]):
                    found = (q, q + len(cand))
            spans[p] = found
            if found is not None:
                pos = found[1]
    return spans


def build_chat_tokenize(cfg: Any, entry: ChatTemplateOptions, tokenizer: Any) -> ChatTokenize:
    """``build`` of chat formats: resolve the template, check it, return the tokenize callable."""
    spec = entry.chat_template
    where = entry_where(cfg, entry, "chat_template")
    if spec is None and getattr(cfg, "chat_template", None) is not None:  # the config's default for all entries
        spec, where = cfg.chat_template, cfg.where("chat_template")
    template = resolve_chat_template(spec, tokenizer, where, cfg)
    train_on_inputs = entry.train_on_inputs if entry.train_on_inputs is not None else cfg.train_on_inputs
    tok = ChatTokenize(tokenizer, template, entry, train_on_inputs=bool(train_on_inputs),
                       where=entry_where(cfg, entry, "train_on_eos"))
    try:
        compile_template(template)
    except Exception as exc:
        raise FtError(f"{where}: the chat template is not valid jinja: {exc}") from None
    tok.probe()
    return tok


@hookimpl
def ft_register_formats(register):
    register.add("chat_template", ChatTemplateOptions, build_chat_tokenize)
