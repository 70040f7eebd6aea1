"""Configuration: TOML file + environment overrides -> typed, validated dataclasses.

Every key has a default, so a config file holds only what it changes. Any mistake (an unknown
key, a wrong type, a value out of range) raises ConfigError whose message is one line naming
the key and the fix; app.py prints it and exits.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from gateway.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "load",
    "from_mapping",
]


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"  # interface to listen on
    port: int = 5000  # overridden by $PORT (Heroku sets it)
    publish_token: str = ""  # admin token for POST /publish (any channel); "" = off; or $GATEWAY_PUBLISH_TOKEN
    max_body_bytes: int = 1_048_576  # largest publish body / WebSocket frame accepted (413 above it)
    allowed_origins: list[str] = field(default_factory=list)  # other pages' origins allowed, or "*"; [] = same origin
    shutdown_grace_s: float = 10.0  # on SIGTERM, how long streams get to say goodbye (Heroku allows 30 s)
    operator_token: str = ""  # token for /metrics, /channels and /diagnose/reports; prefer $GATEWAY_OPERATOR_TOKEN
    access_log: bool = True  # one log line per request (tokens masked)
    connection_log: bool = True  # one log line per ended stream, WebSocket or held long poll
    stall_timeout_s: float = 120.0  # a connection whose socket makes no progress this long is dropped
    trusted_proxies: list[str] = field(default_factory=list)  # addresses/CIDRs whose X-Forwarded-For names the client
    log_format: str = "text"  # "text" | "json": connection and access log lines
    workers: int = 0  # gateway processes on one port; 0 = $WEB_CONCURRENCY, else 1
    metrics_dir: str = ""  # workers share it (snapshots, counts); "" = a private temp dir; env GATEWAY_METRICS_DIR
    metrics_port: int = 0  # serve /metrics on 127.0.0.1:<port> instead of the public port; 0 = on the public port
    head_timeout_s: float = 10.0  # a request's line and headers must arrive within this (then 408)
    max_head_bytes: int = 32_768  # request line + headers, in total (then 431); nginx's default

    def _check(self) -> None:
        _range("server.port", self.port, 0, 65535)
        _range("server.workers", self.workers, 0, 256)
        _range("server.metrics_port", self.metrics_port, 0, 65535)
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError("server.metrics_port: must differ from server.port (PORT); pick another port or 0")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f'server.log_format: must be "text" or "json", not {self.log_format!r}')
        from gateway.clients import TrustedProxies  # validates each entry with a one-line error

        TrustedProxies(self.trusted_proxies)
        _range("server.max_body_bytes", self.max_body_bytes, 1, 1 << 31)
        _range("server.shutdown_grace_s", self.shutdown_grace_s, 0, 25)
        _range("server.stall_timeout_s", self.stall_timeout_s, 1, 86400)
        _range("server.head_timeout_s", self.head_timeout_s, 0.1, 3600)
        _range("server.max_head_bytes", self.max_head_bytes, 1024, 1 << 20)
        for key in ("publish_token", "operator_token"):
            # An Authorization header cannot carry them, so every request would be refused.
            if getattr(self, key) != getattr(self, key).strip():
                raise ConfigError(f"server.{key}: starts or ends with whitespace or a line break; remove it")


@dataclass
class HistoryConfig:
    size: int = 1000  # events kept per channel for resume
    max_age_s: float = 3600.0  # events older than this are dropped from history (and Idempotency-Keys forgotten)
    max_bytes: int = 4 * 1024 * 1024  # per channel (memory and Redis): data + name + ~200 B per event; oldest out first

    def _check(self) -> None:
        _range("history.size", self.size, 1, 1_000_000)
        _range("history.max_bytes", self.max_bytes, 1024, 1 << 40)
        _range("history.max_age_s", self.max_age_s, 1, 30 * 86400)


@dataclass
class PollConfig:
    max_batch: int = 100  # most events in one poll answer or stream write ("more": true says there are more)
    longpoll_default_timeout_s: float = 25.0  # hold when the client gives no ?timeout= (under common 30 s proxy limits)
    longpoll_max_timeout_s: float = 25.0  # cap on ?timeout= (and on the default)

    def _check(self) -> None:
        _range("poll.max_batch", self.max_batch, 1, 10_000)
        _range("poll.longpoll_max_timeout_s", self.longpoll_max_timeout_s, 0, 3600)
        _range("poll.longpoll_default_timeout_s", self.longpoll_default_timeout_s, 0, 3600)
        # The cap applies to the default too, so lowering the cap alone is enough.
        self.longpoll_default_timeout_s = min(self.longpoll_default_timeout_s, self.longpoll_max_timeout_s)


@dataclass
class SSEConfig:
    heartbeat_s: float = 15.0  # comment line sent when idle, so proxies keep the stream open
    retry_ms: int = 3000  # reconnect delay the browser's EventSource uses
    padding_bytes: int = 0  # initial comment of this many bytes, for proxies that buffer the first KB

    def _check(self) -> None:
        _range("sse.heartbeat_s", self.heartbeat_s, 0.05, 3600)
        _range("sse.retry_ms", self.retry_ms, 0, 3_600_000)
        _range("sse.padding_bytes", self.padding_bytes, 0, 65536)


@dataclass
class WebSocketConfig:
    ping_s: float = 25.0  # keepalive ping interval; a client that misses a pong is dropped
    client_publish: list[str] = field(default_factory=list)  # channels or patterns ("chat.*") clients may publish to

    def _check(self) -> None:
        _range("websocket.ping_s", self.ping_s, 0.05, 3600)


@dataclass
class DemoConfig:
    channel: str = ""  # a built-in ticker publishes here; "" turns it off
    interval_s: float = 1.0  # seconds between ticks

    def _check(self) -> None:
        _range("demo.interval_s", self.interval_s, 0.01, 3600)


# The contract's channel-name rule (gateway/names.py checks requests; this checks config).
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass
class SourceConfig:
    kind: str = ""  # "sse" | "poll" | "websocket"
    url: str = ""  # the upstream (http(s):// or ws(s)://)
    channel: str = ""  # the channel it feeds
    interval: float = 2.0  # poll only: seconds between requests
    headers: dict[str, str] = field(default_factory=dict)  # request headers; ${VAR} is taken from the environment
    mode: str = "eager"  # "eager" | "lazy"
    lazy_grace_s: float = 30.0  # lazy only: how long it stays connected after the last subscriber left
    backoff_initial_s: float = 0.5  # first reconnect delay (doubles, with jitter)
    backoff_max_s: float = 30.0  # longest reconnect delay
    timeout_s: float = 10.0  # connect/read timeout for the upstream
    event: str = ""  # event name to use when the upstream gives none ("" -> "message")
    items: bool = False  # poll only: one event per item of a JSON array
    id_field: str = ""  # poll only, with items: de-duplicate items by this field
    forward_client_messages: bool = False  # websocket only: client frames go upstream
    max_event_bytes: int = 1_048_576  # larger upstream events are dropped (and counted)
    lease_ttl_s: float = 10.0  # with Redis: one process relays it; a standby takes over within ~1 ttl

    def _check(self, key: str = "sources") -> None:
        if self.kind not in ("sse", "poll", "websocket"):
            raise ConfigError(f'{key}.kind: must be "sse", "poll" or "websocket", not {self.kind!r}')
        if not self.url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ConfigError(f"{key}.url: must be an absolute http(s):// or ws(s):// URL")
        if not self.channel:
            raise ConfigError(f"{key}.channel: name the channel this source feeds")
        if not _CHANNEL_NAME.fullmatch(self.channel):
            raise ConfigError(f"{key}.channel: {self.channel!r} is not a valid channel name (A-Z a-z 0-9 . _ : -)")
        if self.kind != "websocket" and self.url.startswith(("ws://", "wss://")):
            raise ConfigError(f"{key}.url: a {self.kind} source needs an http(s):// URL")
        if self.mode not in ("eager", "lazy"):
            raise ConfigError(f'{key}.mode: must be "eager" or "lazy", not {self.mode!r}')
        _range(f"{key}.interval", self.interval, 0.05, 86400)
        _range(f"{key}.backoff_initial_s", self.backoff_initial_s, 0.01, 3600)
        _range(f"{key}.backoff_max_s", self.backoff_max_s, self.backoff_initial_s, 3600)
        _range(f"{key}.timeout_s", self.timeout_s, 0.1, 3600)
        _range(f"{key}.lazy_grace_s", self.lazy_grace_s, 0, 86400)
        _range(f"{key}.max_event_bytes", self.max_event_bytes, 1, 1 << 30)
        _range(f"{key}.lease_ttl_s", self.lease_ttl_s, 0.5, 3600)
        for name, value in self.headers.items():
            for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value):
                if var not in os.environ:
                    raise ConfigError(
                        f"{key}.headers.{name}: environment variable {var} is not set; set it or drop ${{{var}}}"
                    )


@dataclass
class ProxyConfig:
    upstream: str = ""  # paths the gateway does not own are forwarded here, e.g. "http://127.0.0.1:8000"
    timeout_s: float = 30.0  # how long the upstream may take to answer
    websocket_idle_s: float = 120.0  # a bridged WebSocket with no bytes either way this long is closed

    def _check(self) -> None:
        if self.upstream and not self.upstream.startswith(("http://", "https://")):
            raise ConfigError("proxy.upstream: must be an http:// or https:// URL, or empty to turn the proxy off")
        _range("proxy.timeout_s", self.timeout_s, 0.1, 3600)
        _range("proxy.websocket_idle_s", self.websocket_idle_s, 0.5, 86400)


@dataclass
class RedisConfig:
    url: str = ""  # set (or $REDIS_URL) -> channels and history live in Redis, shared by every process
    prefix: str = "gw:"  # key prefix, so several deployments can share one Redis
    tls_verify: bool = True  # rediss:// only; false for self-signed servers such as Heroku Redis
    max_connections: int = 50  # per process, for channels (small Redis plans cap clients, e.g. 20)
    cluster: bool = False  # redis.url names one node of a Redis Cluster (or Valkey cluster)

    def _check(self) -> None:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("redis.url: must start with redis://, rediss:// or unix://")
        if self.url:
            from redis.connection import parse_url  # lazily: only a Redis deployment needs it

            try:
                parse_url(self.url)
            except ValueError as exc:
                reason = str(exc).rstrip(".")
                raise ConfigError(f"redis.url (or REDIS_URL): {reason}; use e.g. redis://host:6379/0") from None
        if not self.prefix or any(c.isspace() or c in "{}" for c in self.prefix):
            raise ConfigError('redis.prefix: must be a non-empty string without spaces or braces, e.g. "gw:"')
        if self.cluster and self.url.startswith("unix://"):
            raise ConfigError(
                "redis.cluster: a cluster is reached over TCP; use a redis:// or rediss:// URL of one node"
            )
        _range("redis.max_connections", self.max_connections, 1, 10_000)


@dataclass
class DiagnoseConfig:
    hold_s: float = 15.0  # how long the quick run holds each transport idle
    thorough_hold_s: float = 110.0  # outlasts Cloudflare's 100 s, nginx's 60 s, Heroku's 55 s idle limits
    max_reports: int = 1000  # shared diagnoses kept for the operator; 0 = none

    def _check(self) -> None:
        _range("diagnose.hold_s", self.hold_s, 0.5, 600)
        _range("diagnose.thorough_hold_s", self.thorough_hold_s, 0.5, 600)
        _range("diagnose.max_reports", self.max_reports, 0, 1_000_000)


@dataclass
class AuthConfig:
    secret: str = ""  # HS256 key for subscriber/publisher tokens (JWT); env GATEWAY_AUTH_SECRET
    upstream_url: str = ""  # ask the app: GET <url>?channel=&transport= with the client's Cookie/Authorization
    public: list[str] = field(default_factory=list)  # channel patterns anyone may read without authorization
    leeway_s: float = 30.0  # clock skew allowed when checking a token's exp (and nbf/iat)
    cache_s: float = 5.0  # how long an answer of the app is reused per credential and channel; 0 = never
    cache_size: int = 10_000  # most answers kept (oldest dropped first)
    upstream_timeout_s: float = 5.0  # no answer within this -> 503, never an allow

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.upstream_url)

    def _check(self) -> None:
        if self.upstream_url and not self.upstream_url.startswith(("http://", "https://")):
            raise ConfigError("auth.upstream_url: must be an http:// or https:// URL, or empty")
        if self.secret and self.secret != self.secret.strip():
            raise ConfigError("auth.secret: starts or ends with whitespace or a line break; remove it")
        _range("auth.leeway_s", self.leeway_s, 0, 3600)
        _range("auth.cache_s", self.cache_s, 0, 3600)
        _range("auth.cache_size", self.cache_size, 1, 10_000_000)
        _range("auth.upstream_timeout_s", self.upstream_timeout_s, 0.1, 5.0)
        for i, pattern in enumerate(self.public):
            if not pattern or any(c.isspace() for c in pattern):
                raise ConfigError(f'auth.public[{i}]: must be a channel pattern like "news.*", not {pattern!r}')


@dataclass
class LimitsConfig:
    max_connections: int = 0  # open streams and held polls in this process; 0 = no limit
    max_connections_per_client: int = 0  # the same per client address; 0 = no limit
    max_channels_per_connection: int = 50  # channels in one /sse/a,b,c request or on one WebSocket (400 above it)
    connect_rate_per_client: float = 0.0  # new connections per second per client (burst 4x); 0 = no limit
    max_channels: int = 0  # channels alive in one process; 0 = no limit
    max_subscribers_per_channel: int = 0  # 0 = no limit
    publish_rate_per_token: float = 0.0  # publishes per second per token or client (burst 4x); 0 = no limit
    ws_publish_rate: float = 20.0  # WebSocket client frames published per second per connection (burst 4x)
    slow_consumer_bytes: int = 1_048_576  # unsent backlog above this disconnects a subscriber

    def _check(self) -> None:
        _range("limits.max_connections", self.max_connections, 0, 10_000_000)
        _range("limits.max_connections_per_client", self.max_connections_per_client, 0, 10_000_000)
        _range("limits.max_channels_per_connection", self.max_channels_per_connection, 1, 10_000)
        _range("limits.connect_rate_per_client", self.connect_rate_per_client, 0, 1_000_000)
        _range("limits.max_channels", self.max_channels, 0, 100_000_000)
        _range("limits.max_subscribers_per_channel", self.max_subscribers_per_channel, 0, 100_000_000)
        _range("limits.publish_rate_per_token", self.publish_rate_per_token, 0, 1_000_000)
        _range("limits.ws_publish_rate", self.ws_publish_rate, 0, 1_000_000)
        _range("limits.slow_consumer_bytes", self.slow_consumer_bytes, 4096, 1 << 31)


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    sse: SSEConfig = field(default_factory=SSEConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def _check(self) -> None:
        sections = ("server", "history", "poll", "sse", "websocket", "demo", "proxy", "redis", "diagnose", "auth")
        for name in (*sections, "limits"):
            getattr(self, name)._check()
        for i, source in enumerate(self.sources):
            source._check(f"sources[{i}]")


# Environment variables the contract names, and where each lands.
ENV_OVERRIDES = {
    "PORT": ("server", "port"),
    "GATEWAY_PUBLISH_TOKEN": ("server", "publish_token"),
    "GATEWAY_OPERATOR_TOKEN": ("server", "operator_token"),
    "REDIS_URL": ("redis", "url"),
    "GATEWAY_AUTH_SECRET": ("auth", "secret"),
    "GATEWAY_METRICS_DIR": ("server", "metrics_dir"),
}


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Read the TOML file (missing default file = all defaults), then apply env overrides."""
    env = os.environ if env is None else env
    explicit = path is not None or "GATEWAY_CONFIG" in env
    path = Path(path or env.get("GATEWAY_CONFIG") or Path(__file__).resolve().parent.parent / "config.toml")
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax at that line") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be read); save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"GATEWAY_CONFIG: cannot read {path} ({exc.strerror})") from None
    elif explicit:
        raise ConfigError(f"GATEWAY_CONFIG: no file at {path}; point it at a TOML file or unset it")
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in env:
            value: Any = env[var]
            if key == "port":
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigError(f"PORT: must be a whole number (got {env[var]!r})") from None
                _range("PORT", value, 0, 65535)
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{section}: must be a table")
            if key in data[section]:  # a broken value in the file is an error, overridden or not
                _check_overridden(section, key, data[section][key])
            data[section][key] = value
    return from_mapping(data)


def _check_overridden(section: str, key: str, value: Any) -> None:
    hint = get_type_hints(get_type_hints(Config)[section])[key]
    checked = _convert(hint, value, f"{section}.{key}")
    if key == "port":
        _range(f"{section}.{key}", checked, 0, 65535)


def listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    """Why the gateway cannot listen, as the one line that names the key to change."""
    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
        return ConfigError(
            f"server.port: cannot listen on {host}:{port} ({exc.strerror}); "
            "set PORT to a free port (above 1023 unless run as root) or stop what holds it"
        )
    return ConfigError(
        f"server.host: cannot listen on {host}:{port} ({exc.strerror}); "
        'set server.host to an address of this machine, e.g. "0.0.0.0" (all) or "127.0.0.1"'
    )


def from_mapping(data: dict[str, Any]) -> Config:
    """Build and validate a Config from plain data (parsed TOML or a test's overrides)."""
    config = _build(Config, data, "")
    config._check()
    return config


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides into a copy of base (tables merge, everything else replaces)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def as_mapping(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key; remove it or use one of: {known}")
        kwargs[key] = _convert(hints[key], value, where)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: must be a table of strings")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f'{where}: must be a string (in quotes, e.g. "value")')
        return value
    return value


def _range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}: {value} is out of range; use a value from {low} to {high}")
