"""The JSON answer of short and long polls, for one channel (v1's shape) or many."""

from __future__ import annotations

import json

from gateway import cursor as cursors
from gateway.admission import Ticket
from gateway.hub import Batch, Hub

__all__ = ["read", "wait", "answer", "counted"]


def read(gateway: Hub, ticket: Ticket, limit: int) -> bytes:
    """A short poll's answer."""
    batches = {c: gateway.read(c, s, limit) for c, s in ticket.starts.items()}
    return answer(ticket, batches, limit)


def wait(gateway: Hub, ticket: Ticket, timeout: float, limit: int) -> bytes:
    """A long poll's answer: held until any of its channels has events, or the timeout."""
    if not ticket.multi:
        ((channel, since),) = ticket.starts.items()
        return counted(ticket, gateway.wait(channel, since, timeout, limit))
    return answer(ticket, gateway.wait_many(ticket.starts, timeout, limit), limit)


def counted(ticket: Ticket, batch: Batch) -> bytes:
    """One channel's answer body; the ticket counts its events and bytes."""
    body = batch.poll_body()
    ticket.events_sent, ticket.bytes_sent = len(batch.events), len(body)  # for the metrics
    return body


def answer(ticket: Ticket, batches: dict[str, Batch], limit: int) -> bytes:
    """The answer's body; the ticket counts the events and bytes it carries."""
    if not ticket.multi:
        (batch,) = batches.values()
        return counted(ticket, batch)
    # Events of every channel, oldest first (ids are times), at most `limit` in all; each
    # channel's cursor stops at its last event included, so nothing cut off is skipped.
    merged = sorted(((e.key, c, e) for c, b in batches.items() for e in b.events), key=lambda t: t[0])
    included = merged[:limit]
    positions = {c: b.cursor for c, b in batches.items()}
    if len(merged) > limit:
        for c, b in batches.items():
            if b.events:
                positions[c] = b.events[0].prev if b.events else b.cursor
        for _, c, e in included:
            positions[c] = e.id
    more = len(merged) > limit or any(b.more for b in batches.values())
    gaps = [c for c, b in batches.items() if b.gap]
    items = ",".join(_item(c, e.json) for _, c, e in included)
    body = (
        f'{{"events":[{items}],"cursor":{json.dumps(cursors.encode(positions))},'
        f'"gap":{"true" if gaps else "false"},"gaps":{json.dumps(gaps)},"more":{"true" if more else "false"}}}'
    ).encode()
    ticket.events_sent, ticket.bytes_sent = len(included), len(body)
    return body


def _item(channel: str, event_json: str) -> str:
    return '{"channel":' + json.dumps(channel, ensure_ascii=False) + "," + event_json[1:]
