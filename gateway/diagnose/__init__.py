"""/diagnose: probe the four transports through whatever sits between a client and the gateway.

plan.py is the one probe plan (the page and the CLI in __main__.py run it), probes.py serves the
page and the helper endpoints, facts.py describes the network path as the server sees it, and
verdict/ turns raw probe results into the verdict (evidence -> rules -> advice; pure, no Flask).
"""

from __future__ import annotations

from typing import Any

from gateway.diagnose.plan import PROBE_PREFIX

__all__ = ["DIAG_PREFIX", "is_diag_channel", "init_app"]

# Probes use fresh channels under this prefix only, so they never touch real channels; clients
# may publish to them (bounded) without the publish token.
DIAG_PREFIX = PROBE_PREFIX
PROBE_FRAME_BYTES = 128  # the largest frame a client may publish on a probe channel


def is_diag_channel(channel: str) -> bool:
    return channel.startswith(DIAG_PREFIX) and len(channel) > len(DIAG_PREFIX)


def init_app(app: Any) -> None:
    from gateway.admission import ChannelPolicy
    from gateway.diagnose import live, probes, reports
    from gateway.state import state

    # Probe channels: readable without authorization, and a page may echo a tiny nonce through
    # them (the WebSocket probe), never a payload worth relaying; their requests are recorded by
    # Flask hooks, so the long-poll fast path leaves them to Flask.
    admission = state(app).admission
    assert admission is not None
    admission.register(
        ChannelPolicy(DIAG_PREFIX + "?*", public=True, client_publish_max_bytes=PROBE_FRAME_BYTES, fast_path=False)
    )
    probes.init_app(app)
    reports.init_app(app)  # POST/GET /diagnose/reports
    app.register_blueprint(live.bp)  # GET /diagnose/live
