"""The one typed object an app holds: config, hub, services and the parts built on them.

Flask keeps it as app.extensions["gateway"]; code reads it with state() (inside a request) or
state(app). Nothing else of ours goes into app.extensions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from flask import Flask, current_app

from gateway.clients import TrustedProxies
from gateway.config import Config
from gateway.hub import Hub

if TYPE_CHECKING:  # only for type checkers: the lower layers never import these at run time
    from gateway.admission import Admission

__all__ = ["State", "Service", "state", "install"]

KEY = "gateway"
_T = TypeVar("_T")


class Service(Protocol):
    """Background work the server starts after listening and stops on shutdown."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass
class State:
    config: Config
    hub: Hub
    trusted: TrustedProxies
    services: list[Service] = field(default_factory=list)
    sources: list[Any] = field(default_factory=list)  # gateway.sources.Source, for /status
    # channel -> callable(text): client WebSocket frames on that channel go to an upstream.
    upstream_writers: dict[str, Callable[[str], None]] = field(default_factory=dict)
    admission: Admission | None = None
    # Parts of higher layers (diagnose, reports, metrics) keep their own typed objects here,
    # keyed by their class, so this module needs to know none of them.
    parts: dict[type, Any] = field(default_factory=dict)

    def part(self, cls: type[_T]) -> _T:
        return self.parts[cls]


def install(app: Flask, st: State) -> State:
    app.extensions[KEY] = st
    return st


def state(app: Flask | None = None) -> State:
    return (app or current_app).extensions[KEY]
