"""Access control: who may read and publish each channel (contract "Access control (v2)").

With neither auth.secret nor auth.upstream_url set, every channel is public (v1). Otherwise a
channel that matches no public pattern needs a valid token whose `channels` claim matches it, or,
for a request without a valid token, the app's yes (auth.upstream_url). Refusals are 401 (no or
bad credential, with WWW-Authenticate: Bearer) or 403 (a valid credential without that channel).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.auth.tokens import Claims, TokenError, TokenVerifier, matches
from gateway.auth.upstream import ALLOW, UNAVAILABLE, AppAuthorizer
from gateway.config import Config
from gateway.errors import BadRequest

__all__ = ["Authorizer", "Principal", "Credentials", "ANONYMOUS", "unauthorized", "forbidden", "matches"]


@dataclass(frozen=True)
class Credentials:
    """What a request carries that may say who it is."""

    token: str | None  # Bearer header, else ?token=
    cookie: str | None
    authorization: str | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any], query_token: str | None) -> Credentials:
        authorization = environ.get("HTTP_AUTHORIZATION")
        token = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        return cls(token or query_token or None, environ.get("HTTP_COOKIE"), authorization)


@dataclass(frozen=True)
class Principal:
    """Who was admitted: for logs (sub), publishing (claims) and when a stream must end."""

    sub: str = ""
    claims: Claims | None = None
    expires_at: float | None = None  # wall clock; streams end then


ANONYMOUS = Principal()


def unauthorized(detail: str) -> BadRequest:
    return BadRequest("unauthorized", detail, 401, {"WWW-Authenticate": 'Bearer realm="gateway"'})


def forbidden(detail: str) -> BadRequest:
    return BadRequest("forbidden", detail, 403)


class Authorizer:
    def __init__(self, config: Config, public_patterns: Sequence[str] = ()) -> None:
        auth = config.auth
        self.enabled = auth.enabled
        self._public = [*auth.public, *public_patterns]
        self._tokens = TokenVerifier(auth.secret, auth.leeway_s) if auth.secret else None
        self._app = (
            AppAuthorizer(auth.upstream_url, auth.upstream_timeout_s, auth.cache_s, auth.cache_size)
            if auth.upstream_url
            else None
        )
        self._publish_token = config.server.publish_token
        self._leeway = auth.leeway_s

    def add_public(self, pattern: str) -> None:
        """Channels anyone may read (the probe channels register theirs here)."""
        self._public.append(pattern)

    def is_public(self, channel: str) -> bool:
        return not self.enabled or matches(channel, self._public)

    # -- reading ---------------------------------------------------------------------------
    def read(self, channels: Sequence[str], transport: str, creds: Credentials) -> Principal:
        """The principal allowed to read every one of `channels`, or raise 401/403/503."""
        private = [c for c in channels if not self.is_public(c)]
        if not private:  # anyone may read these; a token only adds its publish rights
            claims = self._claims(creds, quiet=True) if self._tokens is not None and creds.token else None
            return Principal(claims.sub, claims, self._expiry(claims)) if claims is not None else ANONYMOUS
        claims = self._claims(creds) if self._tokens is not None and creds.token else None
        if claims is not None:
            principal = Principal(claims.sub, claims, self._expiry(claims))
            denied = [c for c in private if not claims.may_read(c)]
            if denied:
                raise forbidden(f"this token does not grant {denied[0]!r}; ask for a token whose channels include it")
            return principal
        if self._app is None:
            if creds.token and self._tokens is not None:
                self._claims(creds, strict=True)  # raises the token's own reason
            raise unauthorized(
                f"{private[0]!r} is private: send a token as 'Authorization: Bearer <token>' or ?token=<token>"
            )
        deadline = self._app.budget()  # one timeout for all of this request's questions
        for channel in private:
            status = self._app.decide(channel, transport, creds.cookie, creds.authorization, deadline)
            if status == ALLOW:
                continue
            if status == 401:
                raise unauthorized(f"the app did not recognise this client for {channel!r}; log in or send a token")
            if status == 403:
                raise forbidden(f"the app does not let this client read {channel!r}")
            assert status == UNAVAILABLE
            raise BadRequest(
                "auth_unavailable",
                "the app that decides access (auth.upstream_url) did not answer; try again shortly",
                503,
                {"Retry-After": "5"},
            )
        return ANONYMOUS

    # -- publishing ------------------------------------------------------------------------
    def publish(self, channel: str, creds: Credentials) -> Principal:
        """May this request publish to `channel`? server.publish_token may everywhere; a token
        whose `publish` claim matches may there. Raises 401/403 otherwise."""
        if not self._publish_token and self._tokens is None:
            raise BadRequest(
                "publishing_off",
                "publishing is off because no token is configured; set GATEWAY_PUBLISH_TOKEN "
                "(or server.publish_token in config.toml) and send it as 'Authorization: Bearer <token>'",
                403,
            )
        given = creds.token or ""
        if self._publish_token and hmac.compare_digest(given.encode(), self._publish_token.encode()):
            return Principal(sub="publish_token")
        if not given:
            raise unauthorized(
                "send the publish token (or a token with a publish claim) as 'Authorization: Bearer <token>'"
            )
        if self._tokens is None:
            raise unauthorized("this is not the publish token; send it as 'Authorization: Bearer <token>'")
        claims = self._claims(creds, strict=True)
        assert claims is not None
        if not claims.may_publish(channel):
            raise forbidden(f"this token may not publish to {channel!r}; its publish claim must match the channel")
        return Principal(claims.sub, claims, self._expiry(claims))

    def _expiry(self, claims: Claims) -> float:
        """When a stream opened with these claims ends: at exp, as the contract says. Only a
        token that is already past exp by this clock (accepted within the leeway, for skew)
        gets the rest of the leeway, else its stream would end at once and its client loop."""
        if claims.exp > time.time():
            return claims.exp
        return claims.exp + self._leeway

    def may_publish(self, principal: Principal, channel: str) -> bool:
        """For WebSocket client frames: the connection's token allows publishing here."""
        return principal.claims is not None and principal.claims.may_publish(channel)

    def _claims(self, creds: Credentials, strict: bool = False, quiet: bool = False) -> Claims | None:
        assert self._tokens is not None and creds.token is not None
        try:
            return self._tokens.verify(creds.token)
        except TokenError as exc:
            if quiet:
                return None
            if strict or self._app is None:
                raise unauthorized(str(exc)) from None
            return None  # no valid token: the app decides
