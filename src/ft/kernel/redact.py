"""Secrets never reach a log, a saved config or an error: keys whose name says secret, the credentials of a URL,
signed query parameters, ``Authorization:`` values and bearer tokens are replaced by ``***``."""

from __future__ import annotations

import re
from typing import Any

# Redaction (``redact``): a key is secret when a word of its name (split at _ - . and camelCase) is one of
# SECRET_WORDS or ends in token/secret/password (``apitoken``), unless the key is one of NOT_SECRET_KEYS (token
# lists and the names of a tokenizer's special tokens). Only string values are redacted (every string under a
# secret key, so a ``credentials:`` mapping goes whole); counts and flags (``max_tokens: 512``,
# ``use_auth_token: true``) stay. Wherever they are, in any string: ``user:password@`` in a URL, a URL query
# parameter whose name is secret or a signature (``?access_token=``, ``&sig=``, ``X-Amz-Signature=``), and the
# credential of an ``Authorization:`` value or of ``Bearer xyz``.
SECRET_WORDS = frozenset({"token", "key", "secret", "secrets", "password", "passwords", "passwd", "pwd",
                          "credential", "credentials", "apikey", "auth", "authorization"})


SIGNATURE_WORDS = frozenset({"sig", "signature"})  # query parameters only: a signed URL's signature


SECRET_WORD_ENDINGS = ("token", "secret", "password", "passwd")


NOT_SECRET_KEYS = frozenset({"tokenizer", "tokens", "special_tokens", "eot_tokens", "eot_token",
                             "additional_special_tokens", "pad_token", "bos_token", "eos_token", "unk_token",
                             "sep_token", "cls_token", "mask_token"})


REDACTED = "***"


_WORD_RE = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:?#]*)(?::[^/@\s?#]*)?@")


_QUERY_PARAM_RE = re.compile(r"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.-]+)=)(?P<value>[^&#\s'\"<>]+)")


_AUTHORIZATION_RE = re.compile(
    r"(?P<lead>\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?(?:(?:bearer|basic|token|digest)\s+)?)"
    r"(?P<value>[^\s'\",;]+)", re.IGNORECASE)


# "Bearer xyz" (the scheme's own spelling) whatever follows; a lowercase "bearer" only before a token-like word
_BEARER_RE = re.compile(r"(?P<lead>\b(?:Bearer|BEARER)\s+)(?P<value>[A-Za-z0-9\-._~+/]+=*)|"
                        r"(?P<lead2>\bbearer\s+)(?P<value2>[A-Za-z0-9\-._~+/]*[0-9_\-.~+/=][A-Za-z0-9\-._~+/]*=*)")


def is_secret_key(key: Any) -> bool:
    """Whether values under config key ``key`` are secrets (see SECRET_WORDS)."""
    name = str(key)
    if name.lower() in NOT_SECRET_KEYS:
        return False
    words = [w.lower() for w in _WORD_RE.split(name) if w]
    return any(w in SECRET_WORDS or w.endswith(SECRET_WORD_ENDINGS) for w in words)


def redact_text(text: str) -> str:
    """``text`` with the secrets in it replaced: the credentials of any URL (``https://user:***@host``,
    ``https://***@host``), secret query parameters (``?access_token=***``, ``&sig=***``) and authorization
    values (``Authorization: Bearer ***``, ``Bearer ***``)."""
    if "@" in text and "://" in text:
        text = _URL_CREDENTIALS_RE.sub(_url_credentials, text)
    if "=" in text:
        text = _QUERY_PARAM_RE.sub(_query_param, text)
    lowered = text.lower()
    if "authorization" in lowered:
        text = _AUTHORIZATION_RE.sub(_keep_lead, text)
    if "bearer" in lowered:
        text = _BEARER_RE.sub(lambda m: f"{m.group('lead') or m.group('lead2')}{REDACTED}", text)
    return text


def _url_credentials(match: re.Match) -> str:
    user = match.group("user")
    has_password = match.group(0)[len(match.group("scheme")) + len(user):].startswith(":")
    return f"{match.group('scheme')}{user}:{REDACTED}@" if has_password else f"{match.group('scheme')}{REDACTED}@"


def _query_param(match: re.Match) -> str:
    name = match.group("name")
    words = {w.lower() for w in _WORD_RE.split(name) if w}
    if is_secret_key(name) or words & SIGNATURE_WORDS:
        return f"{match.group('lead')}{REDACTED}"
    return match.group(0)


def _keep_lead(match: re.Match) -> str:
    return match.group(0) if match.group("value") == REDACTED else f"{match.group('lead')}{REDACTED}"


def redact(value: Any, secret: bool = False) -> Any:
    """A copy of ``value`` (config data) with secrets replaced by ``***`` (see SECRET_WORDS)."""
    if isinstance(value, dict):
        return {k: redact(v, secret or is_secret_key(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secret) for v in value]
    if isinstance(value, str):
        return REDACTED if secret and value else redact_text(value)
    return value
