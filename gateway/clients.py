"""Who the client is: the socket's peer, or, when that peer is a trusted proxy, the last address
it names in X-Forwarded-For. One rule, used by admission, limits, logs, /diagnose and its rate
limits, so a client cannot pick its own identity by sending the header through an untrusted path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.errors import ConfigError

__all__ = ["TrustedProxies", "client_address"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """Addresses and CIDR ranges (`server.trusted_proxies`) whose X-Forwarded-For is believed."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self._networks: list[_Network] = []
        for entry in entries:
            try:
                self._networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"server.trusted_proxies: {entry!r} is not an address or CIDR range; "
                    'use e.g. "127.0.0.1" or "10.0.0.0/8"'
                ) from None

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str) -> bool:
        if not self._networks:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def client(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address for one request (see the module doc)."""
        if forwarded_for and self.trusts(peer):
            last = forwarded_for.rsplit(",", 1)[-1].strip()
            if last and _is_address(last):
                return last
        return peer


def client_address(environ: Mapping[str, Any], trusted: TrustedProxies) -> str:
    """client() for a WSGI environ (Flask's request.environ or the fast paths' own)."""
    peer = environ.get("REMOTE_ADDR") or ""
    return trusted.client(peer, environ.get("HTTP_X_FORWARDED_FOR"))


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True
