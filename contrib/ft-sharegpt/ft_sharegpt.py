"""Dataset type `sharegpt`: ShareGPT conversations, trained like `chat_template`.

A row looks like::

    {"conversations": [{"from": "system", "value": "..."},
                       {"from": "human", "value": "..."},
                       {"from": "gpt", "value": "..."}]}

Roles are mapped to the chat template's (human -> user, gpt -> assistant, system -> system),
then everything -- rendering with the template, finding the trained spans in one render,
``roles_to_train``, ``train_on_eos``, per-message ``training`` flags -- is ft's chat machinery
(:mod:`ft_plugins.chat_template`), so a ShareGPT talk gets exactly the labels of the same talk in OpenAI format.

What this plugin adds: ShareGPT defaults for the chat options, and a loud drop (counted as
"unknown role", with the row's file:line) for a message whose ``from`` is not a known role,
instead of rendering an odd role header into the training text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ft_plugins.chat_template import ChatTemplateOptions, build_chat_tokenize
from pydantic import Field, field_validator

from ft import hookimpl
from ft.api import Dropped

# template role -> ShareGPT `from` values
SHAREGPT_ROLES: dict[str, list[str]] = {"system": ["system"], "user": ["human"], "assistant": ["gpt"]}
SHAREGPT_FIELDS: dict[str, str] = {"role": "from", "content": "value"}
UNKNOWN_ROLE = "unknown role"


class ShareGPTOptions(ChatTemplateOptions):
    """Dataset-entry options of ``type: sharegpt``: chat_template's, with ShareGPT defaults."""

    field_messages: str = Field("conversations", description="Row field holding the list of messages.")
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: dict(SHAREGPT_FIELDS),
        description="Message property -> field name in the data; merged into {role: from, content: value}.",
    )
    roles: dict[str, list[str]] | None = Field(
        default_factory=lambda: {k: list(v) for k, v in SHAREGPT_ROLES.items()},
        description="Template role -> `from` values in the data. Keys given here replace the defaults for that "
        "role; the others keep theirs (system: [system], user: [human], assistant: [gpt]).",
    )
    strict_roles: bool = Field(
        True,
        description="Drop (and count) rows with a `from` value that `roles` does not map. Must stay true: ft "
        "never renders an unknown role as it is (map it with `roles` instead).",
    )

    @field_validator("strict_roles", mode="after")
    @classmethod
    def _roles_are_always_checked(cls, value: bool) -> bool:
        if not value:
            raise ValueError("unknown roles are never rendered as they are (ft's chat machinery drops such rows and "
                             "counts them as 'unknown role'); map them instead, e.g. roles: {assistant: [gpt, bing]}")
        return value

    @field_validator("roles", mode="after")
    @classmethod
    def _keep_default_roles(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]]:
        return {**{k: list(v) for k, v in SHAREGPT_ROLES.items()}, **(value or {})}

    @field_validator("message_property_mappings", mode="after")
    @classmethod
    def _keep_default_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return {**SHAREGPT_FIELDS, **value}


class ShareGPTTokenize:
    """The chat tokenize callable, after a check that every message's role is known (picklable)."""

    def __init__(self, chat: Any, field: str, role_key: str, known_roles: Sequence[str], strict: bool) -> None:
        self.chat = chat
        self.field, self.role_key = field, role_key
        self.known_roles = frozenset(known_roles)
        self.strict = strict

    def unknown_role(self, row: Mapping[str, Any]) -> Dropped | None:
        messages = row.get(self.field)
        if not self.strict or not isinstance(messages, list):
            return None  # malformed rows are reported by the chat machinery
        for i, message in enumerate(messages):
            role = message.get(self.role_key) if isinstance(message, Mapping) else None
            if isinstance(role, str) and role not in self.known_roles:
                return Dropped(
                    UNKNOWN_ROLE,
                    f"message {i} is from '{role}'; known: {', '.join(sorted(self.known_roles))}. Map it with "
                    f"datasets[].roles (e.g. {{assistant: [gpt, {role}]}}) or set strict_roles: false",
                )
        return None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        out: list[Any] = [self.unknown_role(row) for row in rows]
        keep = [i for i, dropped in enumerate(out) if dropped is None]
        for i, result in zip(keep, self.chat([rows[i] for i in keep]) if keep else [], strict=True):
            out[i] = result
        return out


def build_sharegpt_tokenize(cfg: Any, entry: ShareGPTOptions, tokenizer: Any) -> ShareGPTTokenize:
    chat = build_chat_tokenize(cfg, entry, tokenizer)
    roles = entry.roles or {}
    known = {name for names in roles.values() for name in names} | set(roles)
    role_key = entry.message_property_mappings.get("role", "role")
    return ShareGPTTokenize(chat, entry.field_messages, role_key, sorted(known), entry.strict_roles)


@hookimpl
def ft_register_formats(register):
    register.add("sharegpt", ShareGPTOptions, build_sharegpt_tokenize)
