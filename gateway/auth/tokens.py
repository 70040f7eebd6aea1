"""Signed tokens (JWT, HS256): who may read and publish which channels.

Claims: `exp` (required), `channels` (patterns the bearer may read), optional `publish`
(patterns it may publish to), optional `sub` (who, for logs). Only HS256 is accepted, so a
token cannot choose its own algorithm (`alg: none`, or RS256 with our secret as a "public key").
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

log = logging.getLogger(__name__)

__all__ = ["Claims", "TokenError", "TokenVerifier", "matches"]

MAX_TOKEN_CHARS = 8192  # a real token is a few hundred characters; refuse before parsing more


class TokenError(Exception):
    """The token is missing a claim, expired, malformed or not signed with our secret."""


@dataclass(frozen=True)
class Claims:
    channels: tuple[str, ...]
    publish: tuple[str, ...]
    sub: str
    exp: float

    def may_read(self, channel: str) -> bool:
        return matches(channel, self.channels)

    def may_publish(self, channel: str) -> bool:
        return matches(channel, self.publish)


def matches(channel: str, patterns: Sequence[str]) -> bool:
    """Shell-style patterns (* ?), case-sensitive, as channel names are."""
    return any(fnmatch.fnmatchcase(channel, p) for p in patterns)


class TokenVerifier:
    def __init__(self, secret: str, leeway_s: float) -> None:
        self._secret = secret
        self._leeway = leeway_s
        if len(secret.encode()) < 32:  # RFC 7518 3.2: an HS256 key as long as the hash
            log.warning("auth.secret is shorter than 32 bytes; tokens signed with it are easier to forge")

    def verify(self, token: str) -> Claims:
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("the token is too long")
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired; get a fresh one") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"the token is not valid ({type(exc).__name__})") from None
        return Claims(
            channels=_patterns(payload.get("channels")),
            publish=_patterns(payload.get("publish")),
            sub=str(payload.get("sub", ""))[:200],
            exp=float(payload["exp"]),
        )


def _patterns(value: object) -> tuple[str, ...]:
    """A claim of patterns: a list of strings (a lone string is taken as a list of one)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str) and v)
    return ()
