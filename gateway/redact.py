"""Redaction of credentials in URLs, for every page, status answer and log line that shows one.

An upstream URL may carry a password (`http://user:pass@host/`) or a key in its query
(`?api_key=...`). What is shown keeps what helps an operator (scheme, host, port, path, the
names of query parameters and harmless values) and replaces every secret with `***`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote_plus, urlsplit, urlunsplit

__all__ = ["redact_url", "redact_text", "is_secret_name", "MASK"]

MASK = "***"
# Parameter names that look like they carry a credential; matched inside the lowercased name
# with separators removed, so "apiKey", "api-key", "X-Auth-Token" and "access_token" all count.
# Over-matching ("monkey") only hides a harmless value; under-matching would leak a secret.
_SECRET_PARTS = (
    "token",
    "key",
    "secret",
    "pass",
    "pwd",
    "auth",
    "sig",
    "credential",
    "session",
    "jwt",
    "bearer",
    "cookie",
    "private",
    "code",
    "ticket",
    "nonce",
    "hash",
)
_SEPARATORS = re.compile(r"[^a-z0-9]")
# In free text (error messages): userinfo before a host, and name=value pairs of a query.
_USERINFO = re.compile(r"(?<=//)[^/\s@'\"]+@")
# A value runs to the next `&`; a `;` ends it only where another name= follows (the gateway
# reads ?token=a;b as the token "a;b", and ?x=1;token=... as two parameters to be safe).
_QUERY_PAIR = re.compile(r"(?<=[?&;])([^=&;?\s'\"#]+)=((?:[^&;\s'\"#]|;(?![^=&;?\s'\"#]+=))*)")


# A JWT wherever it stands (a path, a header quoted in an error): base64url header `eyJ...`,
# payload and signature. No other text the gateway logs has that shape.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")


def is_secret_name(name: str) -> bool:
    """Whether a parameter named `name` (as written, percent-encoded or not) looks secret."""
    low = _SEPARATORS.sub("", unquote_plus(name).lower())
    return any(part in low for part in _SECRET_PARTS)


def redact_url(url: str) -> str:
    """`url` with userinfo and secret-looking query values replaced by ***, the fragment
    dropped; anything unparseable is hidden whole."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return MASK
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        host = f"{MASK}@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(
        f"{quote(name, safe='')}={MASK if is_secret_name(name) else quote(value, safe='')}" for name, value in pairs
    )
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def redact_text(text: str) -> str:
    """Free text (an exception's message, a log line) with URL credentials masked the same way,
    and anything shaped like a JWT; a name written percent-encoded (`%74oken=`) is judged by
    what it decodes to, as the gateway reads it."""
    text = _JWT.sub(MASK, _USERINFO.sub(f"{MASK}@", text))
    return _QUERY_PAIR.sub(lambda m: f"{m.group(1)}={MASK}" if is_secret_name(m.group(1)) else m.group(0), text)
