"""The SSE parser on its own: the format's corner cases, fed whole and split at every byte."""

from __future__ import annotations

import pytest

from gateway.sources.sseparse import Message, SSEParser


def feed_all(data: bytes, split: int | None = None, limit: int = 1 << 20) -> tuple[list[Message], SSEParser]:
    parser = SSEParser(limit)
    out: list[Message] = []
    if split is None:
        out += parser.feed(data)
    else:
        for i in range(0, len(data), split):
            out += parser.feed(data[i : i + split])
    return out, parser


STREAM = (
    b"\xef\xbb\xbf: a comment first\r\n"
    b"retry: 250\r\n\r\n"
    b"id: 7\r\nevent: price\r\ndata: one\r\ndata:  two spaces kept after the first\r\n\r\n"
    b"data: cr only\rdata: second line\r\r"
    b"data: lf\n\n"
    b"id\n\n"  # an empty id resets the last id; no data: fires nothing
    b"unknown: ignored\ndata\n\n"  # a field with no colon: data with empty value
    b"id: bad\x00id\ndata: nul ids are ignored\n\n"
    b"data: unterminated at the end"
)

EXPECTED = [
    Message("one\n two spaces kept after the first", "price", "7", "7"),
    Message("cr only\nsecond line", "", None, "7"),
    Message("lf", "", None, "7"),
    Message("", "", None, ""),
    Message("nul ids are ignored", "", None, ""),
]


@pytest.mark.parametrize("split", [None, 1, 2, 3, 5, 7, 64])
def test_parses_every_field_line_end_and_split(split: int | None) -> None:
    messages, parser = feed_all(STREAM, split)
    assert messages == EXPECTED
    assert parser.retry_ms == 250
    assert parser.dispatched_id == ""


def test_bom_only_stripped_at_the_start() -> None:
    messages, _ = feed_all(b"data: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert [m.data for m in messages] == ["a"]  # a later BOM is part of a field name: ignored


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r") == [Message("x", "", None, "")]
    assert parser.feed(b"\ndata: y\n\n") == [Message("y", "", None, "")]


def test_multibyte_utf8_split_across_chunks() -> None:
    data = "data: \u00e9\u20ac\U0001f600\n\n".encode()
    messages, _ = feed_all(data, 1)
    assert messages[0].data == "\u00e9\u20ac\U0001f600"


def test_oversized_event_is_skipped_without_buffering_and_counted() -> None:
    big = b"id: 1\ndata: " + b"x" * 5000 + b"\n\ndata: after\n\n"
    for split in (None, 100, 4096):
        parser = SSEParser(1000)
        out: list[Message] = []
        chunks = [big] if split is None else [big[i : i + split] for i in range(0, len(big), split)]
        for chunk in chunks:
            out += parser.feed(chunk)
            assert len(parser._buf) <= 1000 + (split or 0)  # memory stays bounded
        assert [m.data for m in out] == ["after"]
        assert parser.oversized == 1
        assert parser.dispatched_id == "1"  # resuming skips the dropped event, not the next


def test_many_small_data_lines_over_the_limit_are_dropped_too() -> None:
    messages, parser = feed_all(b"data: abc\n" * 500 + b"\ndata: ok\n\n", limit=1000)
    assert [m.data for m in messages] == ["ok"]
    assert parser.oversized == 1


def test_invalid_retry_is_ignored() -> None:
    _, parser = feed_all(b"retry: soon\nretry: 12a\n\n")
    assert parser.retry_ms is None
