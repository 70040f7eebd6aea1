"""The one path every subscription passes, on every transport, for one channel or many.

admit() reads the request's channels and cursor, identifies the client (credential, address),
authorizes every channel, applies the limits, and returns a Ticket. Opening the ticket counts the
connection (hub subscribers per channel, per-transport counts, connection limits, metrics);
closing it releases all of that and logs the connection's end. The transports then only stream
what the ticket allows. The long-poll fast path calls the same admit() with a WSGI environ.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from gateway import cursor as cursors
from gateway.auth import ANONYMOUS, Authorizer, Credentials, Principal
from gateway.clients import TrustedProxies, client_address
from gateway.config import Config
from gateway.errors import BadRequest
from gateway.hub import Hub
from gateway.limits import TokenBuckets, over_limit
from gateway.memo import BoundedMemo
from gateway.names import check_channel

__all__ = ["Admission", "Ticket", "ChannelPolicy", "Observer", "parse_channels", "TRANSPORTS"]

log = logging.getLogger("gateway.connections")

TRANSPORTS = ("poll", "longpoll", "sse", "ws")
MEMO_TEXTS = 4096  # channel lists whose parse and fast-path answer are remembered (then forgotten at once)
MEMO_TEXT_CHARS = 256  # ... each at most this long (anyone may send any text: a memo stays ~1 MB)
HELD = frozenset({"longpoll", "sse", "ws", "tunnel"})  # these hold a connection while they run


@dataclass(frozen=True)
class ChannelPolicy:
    """Rules for a family of channels that another part registers (e.g. the probe channels):
    readable without authorization, clients may publish small frames, and whether the long-poll
    fast path may serve them (their own request hooks live in Flask)."""

    pattern: str
    public: bool = True
    client_publish_max_bytes: int = 0  # 0: clients may not publish here by this policy
    fast_path: bool = True


class Observer:
    """What admission tells whoever counts (metrics, connection logs). No-ops here."""

    def connection_opened(self, transport: str) -> None:
        pass

    def connection_closed(self, ticket: Ticket, reason: str) -> None:
        pass

    def refused(self, transport: str, status: int, reason: str) -> None:
        pass


def parse_channels(text: str, limit: int) -> list[str]:
    """A channel name or a comma-separated list of them: each valid, duplicates dropped."""
    names = text.split(",") if text else [""]
    if len(names) > limit:
        raise BadRequest(
            "too_many_channels",
            f"{len(names)} channels in one request; at most {limit} (limits.max_channels_per_connection)",
        )
    return list(dict.fromkeys(check_channel(n) for n in names))


@dataclass(slots=True)
class Ticket:
    """An admitted subscription: what it may read, from where, and who it is."""

    transport: str
    channels: list[str]
    starts: dict[str, str | None]  # channel -> resume id (None: from now)
    multi: bool  # the request named a list: events carry their channel, one cursor for all
    client: str
    principal: Principal
    admission: Admission
    opened_at: float = field(default_factory=time.monotonic)
    events_sent: int = 0
    bytes_sent: int = 0
    end_reason: str = "client_closed"
    credentials: Credentials | None = None
    _open: bool = False
    _closed: bool = False

    @property
    def expires_at(self) -> float | None:
        return self.principal.expires_at

    def seconds_left(self) -> float | None:
        """Until the token expires (None: never)."""
        exp = self.principal.expires_at
        return None if exp is None else exp - time.time()

    def open(self) -> Ticket:
        if not self._open and not self._closed:
            self._open = True
            self.admission._opened(self)
        return self

    def close(self, reason: str | None = None) -> None:
        if reason is not None:
            self.end_reason = reason
        if self._open and not self._closed:
            self._closed = True
            self.admission._closed(self)
        self._closed = True

    def add_channel(self, channel: str) -> None:
        """A channel subscribed on an open WebSocket (already authorized by admit_more)."""
        if channel not in self.channels:
            self.channels.append(channel)
            if self._open:
                self.admission._count(channel, self.transport, +1)

    def remove_channel(self, channel: str) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
            if self._open:
                self.admission._count(channel, self.transport, -1)

    def __enter__(self) -> Ticket:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Admission:
    def __init__(self, config: Config, hub: Hub, trusted: TrustedProxies) -> None:
        self.config = config
        self.hub = hub
        self.trusted = trusted
        self.auth = Authorizer(config)
        self.observer = Observer()
        self.policies: list[ChannelPolicy] = []
        self._policy_patterns: list[tuple[re.Pattern[str], ChannelPolicy]] = []
        self._fast_ok: BoundedMemo[str, bool] = BoundedMemo(MEMO_TEXTS, MEMO_TEXT_CHARS)
        # channel list text -> its valid channels
        self._parsed: BoundedMemo[str, tuple[str, ...]] = BoundedMemo(MEMO_TEXTS, MEMO_TEXT_CHARS)
        limits = config.limits
        self._limits = limits
        self._open = 0  # held connections in this process
        self._per_client: Counter[str] = Counter()
        self._per_channel: dict[tuple[str, str], int] = {}  # (channel, transport) -> open tickets
        self._connect_rate = (
            TokenBuckets(limits.connect_rate_per_client, 4 * limits.connect_rate_per_client)
            if limits.connect_rate_per_client
            else None
        )
        self._publish_rate = (
            TokenBuckets(limits.publish_rate_per_token, 4 * limits.publish_rate_per_token)
            if limits.publish_rate_per_token
            else None
        )

    # -- registration -------------------------------------------------------------------------
    def register(self, policy: ChannelPolicy) -> None:
        self.policies.append(policy)
        self._fast_ok.clear()
        self._policy_patterns.append((re.compile(fnmatch.translate(policy.pattern)), policy))
        if policy.public:
            self.auth.add_public(policy.pattern)

    def policy(self, channel: str) -> ChannelPolicy | None:
        for pattern, policy in self._policy_patterns:
            if pattern.match(channel):
                return policy
        return None

    def fast_path_ok(self, channels_text: str) -> bool:
        """May the long-poll fast path serve these channels (comma-separated)? Asked on every
        poll, so the answer is remembered per text (a bounded memo: any text may come)."""
        known = self._fast_ok.get(channels_text)
        if known is None:
            known = all((p := self.policy(c)) is None or p.fast_path for c in channels_text.split(","))
            self._fast_ok.remember(channels_text, known, len(channels_text))
        return known

    # -- the path -----------------------------------------------------------------------------
    def admit(
        self,
        environ: Mapping[str, Any],
        transport: str,
        channels_text: str,
        *,
        args: Mapping[str, str] | None = None,
    ) -> Ticket:
        """Admit one subscription request, or raise BadRequest (400/401/403/429/503)."""
        try:
            return self._admit(environ, transport, channels_text, args)
        except BadRequest as exc:
            self.observer.refused(transport, exc.status, exc.code)
            raise

    def _admit(
        self, environ: Mapping[str, Any], transport: str, channels_text: str, args: Mapping[str, str] | None
    ) -> Ticket:
        if args is None:
            args = query_args(environ.get("QUERY_STRING", ""))
        channels = self._parse_channels(channels_text)
        multi = "," in channels_text
        since = environ.get("HTTP_LAST_EVENT_ID") if transport == "sse" else None
        since = since or args.get("since") or None
        starts = self.starts(channels, since, multi)
        client = client_address(environ, self.trusted)
        creds = Credentials.from_environ(environ, args.get("token")) if self.auth.enabled else None
        principal = self.auth.read(channels, transport, creds) if creds is not None else ANONYMOUS
        if transport in HELD:
            self._check_room(client, channels)
        ticket = Ticket(transport, channels, starts, multi, client, principal, self)
        ticket.credentials = creds if transport == "ws" else None  # kept for subscribe on the open socket
        return ticket

    def _parse_channels(self, text: str) -> list[str]:
        """parse_channels(), remembered per text (a poller asks for the same list every time)."""
        known = self._parsed.get(text)
        if known is None:
            known = tuple(parse_channels(text, self._limits.max_channels_per_connection))
            self._parsed.remember(text, known, len(text))
        return list(known)

    def admit_tunnel(self, environ: Mapping[str, Any]) -> Ticket:
        """A connection that carries no channel but holds a socket (a WebSocket spliced to the
        proxied app): it counts against the same connection limits."""
        client = client_address(environ, self.trusted)
        try:
            self._check_room(client, [])
        except BadRequest as exc:
            self.observer.refused("tunnel", exc.status, exc.code)
            raise
        return Ticket("tunnel", [], {}, False, client, ANONYMOUS, self)

    def starts(self, channels: list[str], since: str | None, multi: bool) -> dict[str, str | None]:
        if since is None:
            return dict.fromkeys(channels)
        if multi and not cursors.is_multi(since):
            raise BadRequest(
                "invalid_since",
                f"{since[:64]!r} is one channel's id; a request for several channels resumes from the cursor it gave",
            )
        return cursors.decode(since, channels)

    def admit_more(self, ticket: Ticket, channel: str) -> None:
        """Authorize one more channel for an open connection (WebSocket subscribe)."""
        check_channel(channel)
        if channel in ticket.channels:
            return
        if len(ticket.channels) >= self._limits.max_channels_per_connection:
            raise BadRequest(
                "too_many_channels",
                f"at most {self._limits.max_channels_per_connection} channels on one connection",
            )
        if self.auth.is_public(channel):
            return
        claims = ticket.principal.claims
        if claims is not None:  # the connection's token decides, as it did for the URL's channels
            if not claims.may_read(channel):
                raise BadRequest("forbidden", f"this connection's token does not grant {channel!r}", 403)
            return
        # No token: what the handshake carried (the app's cookie, say) is asked, as for the URL.
        self.auth.read([channel], ticket.transport, ticket.credentials or Credentials(None, None, None))

    def _check_room(self, client: str, channels: list[str]) -> None:
        limits = self._limits
        if limits.max_connections and self._open >= limits.max_connections:
            raise over_limit(
                503, "too_many_connections", "the gateway is at limits.max_connections; try again shortly", 5
            )
        if limits.max_connections_per_client and self._per_client[client] >= limits.max_connections_per_client:
            raise over_limit(
                429,
                "too_many_connections_from_client",
                f"this client already holds {limits.max_connections_per_client} connections "
                "(limits.max_connections_per_client); close one first",
                5,
            )
        if limits.max_subscribers_per_channel:
            for channel in channels:
                if self.hub.subscribers(channel) >= limits.max_subscribers_per_channel:
                    raise over_limit(
                        503, "channel_full", f"{channel!r} has limits.max_subscribers_per_channel subscribers", 5
                    )
        self._check_channel_room(channels)
        if self._connect_rate is not None:
            wait = self._connect_rate.take(client)
            if wait:
                raise over_limit(
                    429, "connecting_too_fast", "too many new connections from this client; slow down", wait
                )

    def check_publish(self, environ: Mapping[str, Any], channel: str, principal: Principal) -> None:
        """Limits on publishing: the rate per token (or per client for the admin token's holder
        behind one address) and the channels one process keeps."""
        if self._publish_rate is not None:
            key = principal.sub or client_address(environ, self.trusted)
            wait = self._publish_rate.take(key)
            if wait:
                raise over_limit(429, "publishing_too_fast", "too many publishes with this token; slow down", wait)
        self._check_channel_room([channel])

    def _check_channel_room(self, channels: list[str]) -> None:
        cap = self._limits.max_channels
        if cap and any(not self.hub.has_channel(c) for c in channels) and self.hub.channel_count() >= cap:
            raise over_limit(503, "too_many_channels_alive", "the gateway holds limits.max_channels channels", 30)

    # -- counting -----------------------------------------------------------------------------
    def _opened(self, ticket: Ticket) -> None:
        if ticket.transport in HELD:
            self._open += 1
            self._per_client[ticket.client] += 1
        for channel in ticket.channels:
            self._count(channel, ticket.transport, +1)
        self.observer.connection_opened(ticket.transport)

    def _closed(self, ticket: Ticket) -> None:
        if ticket.transport in HELD:
            self._open -= 1
            self._per_client[ticket.client] -= 1
            if self._per_client[ticket.client] <= 0:
                del self._per_client[ticket.client]
        for channel in ticket.channels:
            self._count(channel, ticket.transport, -1)
        self.observer.connection_closed(ticket, ticket.end_reason)

    def _count(self, channel: str, transport: str, delta: int) -> None:
        key = (channel, transport)
        n = self._per_channel.get(key, 0) + delta
        if n > 0:
            self._per_channel[key] = n
        else:
            self._per_channel.pop(key, None)
        if transport in HELD:  # lazy upstream sources follow the hub's subscriber count
            if delta > 0:
                self.hub.subscribe(channel)
            else:
                self.hub.unsubscribe(channel)

    def connections(self) -> int:
        return self._open

    def held_polls(self) -> int:
        """The channels of the long polls held now (0: none is held): a shutdown waits for
        their answers."""
        return sum(n for (_, transport), n in self._per_channel.items() if transport == "longpoll")

    def subscribers(self, channel: str) -> dict[str, int]:
        """Open subscriptions to `channel` per transport (for /channels/<name>)."""
        return {t: self._per_channel.get((channel, t), 0) for t in ("sse", "ws", "longpoll")}

    def subscriptions(self) -> dict[str, dict[str, int]]:
        """Every channel with open subscriptions in this process: {channel: {transport: n}}."""
        out: dict[str, dict[str, int]] = {}
        for (channel, transport), n in self._per_channel.items():
            out.setdefault(channel, {})[transport] = n
        return out


def query_args(query: str) -> dict[str, str]:
    """The first value of each key, as Flask's request.args.get() would give it (the long-poll
    fast path calls this for every request: plain keys and values skip the decoder)."""
    out: dict[str, str] = {}
    if not query:
        return out
    if "%" in query or "+" in query or ";" in query:
        for key, value in parse_qsl(query, keep_blank_values=True):
            out.setdefault(key, value)
        return out
    for part in query.split("&"):
        if part:
            key, _, value = part.partition("=")
            if key not in out:
                out[key] = value
    return out
