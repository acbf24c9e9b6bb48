"""The one home of vdiag's redaction rules: nothing secret leaves the machine in a run folder.

Two kinds of rule:

* **names** (`is_secret_name`): an environment variable whose name contains (case-insensitive) secret,
  token, api, access, password, passwd, key, credential, auth or private, or starts with AWS_ or HF_,
  has its value replaced by ``<redacted>``. This is a superset of what vLLM's own ``collect_env`` hides.
  It errs on the side of hiding (``TOKENIZERS_PARALLELISM`` and ``HF_HOME`` are hidden too).
* **free text** (`redact_text`: command lines, stderr tails, stacks, tool output): values after
  secret-looking flags (``--token X``, ``--api-key=X``, ``--password X``), ``KEY=VALUE`` / ``key: value``
  pairs whose key looks secret, credentials in URLs (``https://user:pw@host``), ``Bearer`` tokens, PEM
  private keys, and values that look like keys whatever they follow (``hf_...``, ``sk-...``, ``AKIA...``,
  ``ghp_...``, ``xoxb-...``, JWTs).

In free text a lower-case or mixed-case key is judged by its words, so that diagnostic values survive:
``--api-key``, ``hf_token``, ``clientSecret`` and ``--auth-token`` are secret; ``token_num``,
``--max-num-batched-tokens`` and ``--tokenizer`` are not. An upper-case key (``HF_TOKEN=...``) is judged
like an environment variable name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

REDACTED = "<redacted>"

_NAME_PARTS = (
    "secret",
    "token",
    "api",
    "access",
    "password",
    "passwd",
    "key",
    "credential",
    "auth",
    "private",
)
_NAME_PREFIXES = ("AWS_", "HF_")

# Words that make a key secret wherever they appear in it ...
_STRONG_WORDS = frozenset(
    {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "credential", "credentials", "apikey"}
)
# ... and words that make it secret only as its last word (hf_token, api_key, but not token_num).
_LAST_WORDS = frozenset({"token", "key", "auth", "authorization", "cookie", "signature"})


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret (its value must be hidden)."""
    low = name.lower()
    return any(p in low for p in _NAME_PARTS) or name.upper().startswith(_NAME_PREFIXES)


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)  # camelCase -> camel Case
    return [w for w in re.split(r"[\s_.\-]+", spaced.lower()) if w]


def _key_is_secret(key: str) -> bool:
    key = key.strip("-")
    if not key:
        return False
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and any(c.isalpha() for c in key):
        return is_secret_name(key)  # looks like an environment variable
    words = _words(key)
    if not words:
        return False
    return bool(_STRONG_WORDS.intersection(words)) or words[-1] in _LAST_WORDS


# Values that are secret whatever precedes them.
_VALUE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bxox[abprse]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
)
_AUTH_HEADER = re.compile(
    r"\b(Authorization[\"']?[ \t]*[:=][ \t]*[\"']?)([A-Za-z]+[ \t]+)?[^\s\"',;]+", re.IGNORECASE
)
_BEARER = re.compile(r"\b(Bearer)([ \t]+)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
_URL_CREDS = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/\s:@]+):([^/\s@]+)@")

_QUOTED_OR_WORD = r"\"[^\"\n]*\"|'[^'\n]*'"
_FLAG_EQ = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)=(" + _QUOTED_OR_WORD + r"|\S+)")
_FLAG_SP = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)([ \t]+)(" + _QUOTED_OR_WORD + r"|(?!-)\S+)")
_KV = re.compile(
    r"(?<![\w-])(?P<q>[\"']?)(?P<key>[A-Za-z_][\w.-]*)(?P=q)(?P<sep>[ \t]*[=:][ \t]*)"
    r"(?P<val>" + _QUOTED_OR_WORD + r"|[^\s\"',;})\]]+)"
)


def _quoted(val: str) -> str:
    if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
        return val[0] + REDACTED + val[0]
    return REDACTED


def _flag_eq(m: re.Match[str]) -> str:
    return f"{m[1]}={_quoted(m[2])}" if _key_is_secret(m[1]) else m[0]


def _flag_sp(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2]}{_quoted(m[3])}" if _key_is_secret(m[1]) else m[0]


def _kv(m: re.Match[str]) -> str:
    if not _key_is_secret(m["key"]) or m["val"].startswith(":"):  # `::` is C++ scope, not a value
        return m[0]
    if m["key"].lower() == "authorization":  # already handled, with its scheme kept
        return m[0]
    return f"{m['q']}{m['key']}{m['q']}{m['sep']}{_quoted(m['val'])}"


def redact_text(text: str) -> str:
    """Scrub secrets from free text (command lines, stderr tails, stacks, tool output)."""
    if not text:
        return text
    for pat in _VALUE_PATTERNS:
        text = pat.sub(REDACTED, text)
    text = _URL_CREDS.sub(lambda m: f"{m[1]}{m[2]}:{REDACTED}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m[1]}{m[2] or ''}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    text = _FLAG_EQ.sub(_flag_eq, text)
    text = _FLAG_SP.sub(_flag_sp, text)
    return _KV.sub(_kv, text)


def redact_env(mapping: Mapping[str, str]) -> dict[str, str]:
    """A copy of an environment with secret variables' values hidden and the others' text scrubbed."""
    return {k: REDACTED if is_secret_name(k) else redact_text(v) for k, v in mapping.items()}


_FLAG_ONLY = re.compile(r"--?[A-Za-z][\w-]*")
_FLAG_WITH_VALUE = re.compile(r"(--?[A-Za-z][\w-]*)=(.*)", re.DOTALL)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line with the values of secret flags (``--token X``, ``--api-key=X``) and secret-looking
    values hidden. Each argument is also scrubbed with `redact_text`."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            hide_next = False
            if not (arg.startswith("-") and len(arg) > 1):  # `--use-auth-token --other`: a boolean flag
                out.append(REDACTED)
                continue
        m = _FLAG_WITH_VALUE.fullmatch(arg)
        if m and _key_is_secret(m[1]):
            out.append(f"{m[1]}={REDACTED}")
            continue
        if _FLAG_ONLY.fullmatch(arg) and _key_is_secret(arg):
            out.append(arg)
            hide_next = True
            continue
        out.append(redact_text(arg))
    return out
