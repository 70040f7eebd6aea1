"""Reading a request body with a size limit, shared by every route that takes one; and an
answer's body whole, for the places that call the WSGI app themselves."""

from __future__ import annotations

from typing import Any

from flask import request

from gateway.errors import BadRequest

__all__ = ["read_limited", "read_stream", "drain"]


def read_limited(limit: int, detail: str) -> bytes:
    """The Flask request's body, or 413 `too_large` (with `detail`) past `limit` bytes."""
    return read_stream(request.stream, request.content_length, limit, detail)


def read_stream(stream: Any, content_length: int | None, limit: int, detail: str) -> bytes:
    """A body from a WSGI input stream: a declared length over `limit` is refused before
    reading, a chunked body as soon as it passes the limit."""
    if content_length is not None and content_length > limit:
        raise BadRequest("too_large", detail, 413)
    try:
        raw = stream.read(limit + 1)
    except (OSError, ValueError):  # the server's chunked decoder refused it (bad chunk size), or a cut-off body
        raise BadRequest("invalid_body", "the body is malformed (bad chunked encoding) or was cut off") from None
    if len(raw) > limit:
        raise BadRequest("too_large", detail, 413)
    return raw


def drain(result: Any) -> bytes:
    """A WSGI answer's body in one piece; the iterable is closed as WSGI requires."""
    try:
        return b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
