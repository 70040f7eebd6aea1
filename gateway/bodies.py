"""Reading a request body with a size limit, shared by every route that takes one."""

from __future__ import annotations

from flask import request

from gateway.errors import BadRequest

__all__ = ["read_limited"]


def read_limited(limit: int, detail: str) -> bytes:
    """The body, or 413 `too_large` (with `detail`) past `limit` bytes: a declared length is
    refused before reading, a chunked body as soon as it passes the limit."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest("too_large", detail, 413)
    try:
        raw = request.stream.read(limit + 1)
    except (OSError, ValueError):  # the server's chunked decoder refused it (bad chunk size), or a cut-off body
        raise BadRequest("invalid_body", "the body is malformed (bad chunked encoding) or was cut off") from None
    if len(raw) > limit:
        raise BadRequest("too_large", detail, 413)
    return raw
