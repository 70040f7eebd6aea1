"""The admission path's pure parts: channel lists, the multi-channel cursor, tokens, client
identity and token buckets."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import cursor as cursors
from gateway.admission import parse_channels
from gateway.auth import Authorizer, Credentials
from gateway.clients import TrustedProxies
from gateway.config import from_mapping
from gateway.errors import BadRequest, ConfigError
from gateway.limits import TokenBuckets

SECRET = "k" * 32
CHANNEL = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,40}", fullmatch=True)
ID = st.tuples(st.integers(0, 10**16 - 1), st.integers(0, 10**10 - 1)).map(lambda t: f"{t[0]}-{t[1]}")


def token(secret: str = SECRET, **claims: object) -> str:
    claims.setdefault("exp", time.time() + 60)
    return jwt.encode(claims, secret, algorithm="HS256")


def creds(tok: str | None = None, **headers: str) -> Credentials:
    environ = {f"HTTP_{k.upper()}": v for k, v in headers.items()}
    return Credentials.from_environ(environ, tok)


def authorizer(**auth: object) -> Authorizer:
    return Authorizer(from_mapping({"auth": {"secret": SECRET, **auth}, "server": {"publish_token": "admin-token"}}))


# -- channel lists and cursors -------------------------------------------------------------------
def test_channel_lists_are_validated_deduplicated_and_bounded():
    assert parse_channels("a,b,a", 50) == ["a", "b"]
    with pytest.raises(BadRequest) as exc:
        parse_channels(",".join(f"c{i}" for i in range(51)), 50)
    assert exc.value.code == "too_many_channels"
    for bad in ("a,,b", "a,-b", "", "a,b/c"):
        with pytest.raises(BadRequest):
            parse_channels(bad, 50)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.dictionaries(CHANNEL, ID, min_size=1, max_size=60))
def test_a_cursor_round_trips_every_channel_position(positions):
    text = cursors.encode(positions)
    assert text.isascii() and " " not in text and "," not in text
    assert cursors.decode(text, list(positions)) == positions


def test_a_cursor_for_50_channels_fits_a_header_and_unknown_channels_start_from_now():
    positions = {f"team.{i:03d}.updates": f"{1796185000000 + i}-{i}" for i in range(50)}
    text = cursors.encode(positions)
    assert len(text) < 1100
    assert cursors.decode(text, ["team.001.updates", "new.channel"]) == {
        "team.001.updates": positions["team.001.updates"],
        "new.channel": None,
    }


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=80))
def test_anything_else_as_a_cursor_is_a_clean_400(text):
    try:
        cursors.decode(text, ["a", "b"])
    except BadRequest as exc:
        assert exc.status == 400 and exc.code == "invalid_since"


# -- tokens ----------------------------------------------------------------------------------------
def test_a_valid_token_reads_the_channels_its_patterns_match():
    auth = authorizer()
    principal = auth.read(["team.7", "team.8"], "sse", creds(token(channels=["team.*"], sub="ann")))
    assert principal.sub == "ann" and principal.expires_at is not None
    with pytest.raises(BadRequest) as exc:
        auth.read(["team.7", "other"], "sse", creds(token(channels=["team.*"])))
    assert exc.value.status == 403 and exc.value.code == "forbidden"


def _alg_none(claims: dict) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-jwt",
        token(secret="w" * 32, channels=["*"]),
        token(channels=["*"], exp=time.time() - 3600),
        _alg_none({"channels": ["*"], "exp": time.time() + 60}),
        jwt.encode({"channels": ["*"]}, SECRET, algorithm="HS256"),  # no exp
        jwt.encode({"channels": ["*"], "exp": time.time() + 60}, SECRET, algorithm="HS512"),
    ],
)
def test_malformed_wrongly_signed_expired_unsigned_or_exp_less_tokens_are_401(bad):
    with pytest.raises(BadRequest) as exc:
        authorizer().read(["private"], "poll", creds(bad))
    assert exc.value.status == 401 and exc.value.headers == {"WWW-Authenticate": 'Bearer realm="gateway"'}


def test_leeway_forgives_a_little_clock_skew_only():
    auth = authorizer(leeway_s=30)
    assert auth.read(["c"], "poll", creds(token(channels=["c"], exp=time.time() - 10))).sub == ""
    with pytest.raises(BadRequest):
        auth.read(["c"], "poll", creds(token(channels=["c"], exp=time.time() - 60)))


def test_a_stream_ends_at_exp_though_the_check_forgives_skew():
    exp = time.time() + 5
    principal = authorizer(leeway_s=30).read(["c"], "sse", creds(token(channels=["c"], exp=exp)))
    assert principal.expires_at == pytest.approx(exp)  # not 30 s later


def test_a_token_accepted_only_thanks_to_the_leeway_keeps_the_rest_of_it():
    exp = time.time() - 10  # expired by our clock, within the 30 s leeway
    principal = authorizer(leeway_s=30).read(["c"], "sse", creds(token(channels=["c"], exp=exp)))
    assert principal.expires_at == pytest.approx(exp + 30)  # else its stream would end at once


def test_a_stray_bearer_on_public_channels_is_no_refusal():
    auth = authorizer(public=["news.*"])
    assert auth.read(["news.today"], "sse", creds("not-our-token")).claims is None
    publisher = auth.read(["news.today"], "ws", creds(token(channels=[], publish=["news.*"])))
    assert publisher.claims is not None and publisher.claims.may_publish("news.today")


def test_the_bearer_header_wins_over_the_query_and_public_channels_need_nothing():
    auth = authorizer(public=["news.*"])
    assert auth.read(["news.today"], "sse", creds()).claims is None
    good = token(channels=["c"])
    assert auth.read(["c"], "ws", creds("garbage", authorization=f"Bearer {good}")).claims is not None
    with pytest.raises(BadRequest) as exc:
        auth.read(["c"], "ws", creds())
    assert exc.value.status == 401


def test_publishing_admin_token_everywhere_scoped_tokens_where_their_claim_matches():
    auth = authorizer()
    assert auth.publish("any", creds("admin-token")).sub == "publish_token"
    assert auth.publish("chat.1", creds(token(channels=[], publish=["chat.*"]))).claims is not None
    with pytest.raises(BadRequest) as exc:
        auth.publish("news", creds(token(channels=["news"], publish=["chat.*"])))
    assert exc.value.status == 403
    with pytest.raises(BadRequest) as exc:
        auth.publish("news", creds("wrong"))
    assert exc.value.status == 401


def test_auth_config_errors_are_one_line():
    for bad in ({"secret": " padded "}, {"upstream_url": "ftp://x"}, {"public": ["has space"]}):
        with pytest.raises(ConfigError) as exc:
            from_mapping({"auth": bad})
        assert "\n" not in str(exc.value) and str(exc.value).startswith("auth.")


# -- who the client is -------------------------------------------------------------------------------
def test_forwarded_for_counts_only_from_a_trusted_proxy():
    trusted = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    assert trusted.client("203.0.113.9", "1.2.3.4") == "203.0.113.9"  # untrusted peer: ignored
    assert trusted.client("10.1.2.3", "9.9.9.9, 1.2.3.4") == "1.2.3.4"  # the last hop's word
    assert trusted.client("127.0.0.1", "not-an-address") == "127.0.0.1"
    assert TrustedProxies().client("127.0.0.1", "1.2.3.4") == "127.0.0.1"
    with pytest.raises(ConfigError):
        TrustedProxies(["10.0.0.0/33"])


def test_token_buckets_refill_and_forget_old_keys():
    buckets = TokenBuckets(rate=1.0, burst=2.0, max_keys=2)
    assert buckets.take("a", now=0) == 0 and buckets.take("a", now=0) == 0
    assert buckets.take("a", now=0) == pytest.approx(1.0)
    assert buckets.take("a", now=1.0) == 0
    buckets.take("b", now=1.0)
    buckets.take("c", now=1.0)  # "a" is forgotten: a fresh burst
    assert buckets.take("a", now=1.0) == 0
