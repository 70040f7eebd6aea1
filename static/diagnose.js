/* /diagnose: run the probe plan (gateway/diagnose/plan.py, handed over in #diagnose-config)
 * through whatever sits between this browser and the gateway, collect raw measurements, get
 * the verdict from POST /diagnose/verdict (the same Python the CLI uses) and show it. This
 * file measures and draws; it judges nothing. Every probe has a hard deadline, so
 * window.__diagnosis and #diagnosis-json are always set. */
(function () {
  "use strict";

  var CONFIG = JSON.parse(document.getElementById("diagnose-config").textContent);
  var HOLD = Number(CONFIG.hold) || 15;
  var PLAN = CONFIG.plan, WAIT = {}, TAGS = PLAN.tags;
  Object.keys(PLAN.waits).forEach(function (k) { WAIT[k] = PLAN.waits[k] * 1000; });  // in ms here
  var ORDER = ["websocket", "sse", "long_poll", "short_poll"];
  // The gateway may be mounted under a path prefix by a proxy: every URL is relative to this page's.
  var BASE = location.pathname.replace(/\/diagnose\/?$/, "");
  var BURST_N = PLAN.burst.n, BURST_GAP = PLAN.burst.gap_ms, PADDING = PLAN.padding_bytes;
  // A subscriber token for the real-channel checks where access control is on (?token=): sent
  // only with those requests, never recorded.
  var TOKEN = new URLSearchParams(location.search).get("token") || "";
  var now = function () { return performance.now(); };
  var sleep = function (ms) { return new Promise(function (r) { setTimeout(r, Math.max(0, ms)); }); };

  function randomId() {
    var a = new Uint8Array(8);
    (window.crypto || window.msCrypto).getRandomValues(a);
    return Array.prototype.map.call(a, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  function errText(e) {
    if (!e) return "unknown error";
    if (e.name === "AbortError") return "no answer before the deadline";
    return String(e.message || e).slice(0, 200);
  }

  /* Resolve when cond() is true (checked every 50 ms) or after ms; returns cond(). */
  async function waitFor(cond, ms) {
    var end = now() + ms;
    while (!cond() && now() < end) await sleep(Math.min(50, end - now()));
    return cond();
  }

  var MIN_RTT = null;  // the quickest round trip of the run (long polls aside): see verdict/evidence.py

  /* fetch with a deadline; never throws. */
  async function call(url, opts, ms) {
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, ms);
    var t0 = now(), out = { status: null, json: null, ms: null, error: null, headers: null };
    try {
      var resp = await fetch(url, Object.assign({ cache: "no-store", signal: ctrl.signal }, opts || {}));
      out.status = resp.status;
      out.headers = resp.headers;
      var text = await resp.text();
      out.ms = Math.round(now() - t0);
      if (url.indexOf("/longpoll/") < 0 && (MIN_RTT === null || out.ms < MIN_RTT)) MIN_RTT = out.ms;
      try { out.json = JSON.parse(text); } catch (e) { out.json = null; }
    } catch (e) {
      out.error = errText(e);
      out.ms = Math.round(now() - t0);
    } finally {
      clearTimeout(timer);
    }
    return out;
  }

  /* Ask the gateway to publish a timed burst on a diag channel; arrivals are recorded into
   * the returned record by whichever probe is listening (at_ms is relative to this request). */
  function burst(channel, n, gapMs, delayMs, tag) {
    var rec = { n: n, gap_ms: gapMs, delay_ms: delayMs, tag: tag, arrivals: [], t0: now() };
    var url = BASE + "/diagnose/burst?channel=" + encodeURIComponent(channel) + "&n=" + n + "&gap_ms=" + gapMs +
      "&delay_ms=" + delayMs + "&tag=" + tag;
    // POST, or GET where something on the path refuses POSTs (the endpoint takes both); when the
    // gateway is busy (429/503: many people diagnosing behind one address), wait and try again.
    rec.request = (async function () {
      var method = "POST", r, retry = PLAN.retries;
      for (var attempt = 0; attempt < retry.burst_attempts; attempt++) {
        rec.t0 = now();  // arrivals count from the request that publishes
        r = await call(url, method === "POST" ? { method: "POST" } : {}, WAIT.request);
        if (r.status === 429 || r.status === 503) {
          await sleep(retry.burst_backoff_ms + retry.burst_backoff_step_ms * attempt);
          continue;
        }
        if (r.status === 202 || method === "GET") break;
        rec.post_fallback = r.error || "HTTP " + r.status;
        method = "GET";
      }
      return r;
    })().then(function (r) {
      rec.post_status = r.status;
      rec.post_ms = r.ms;
      if (r.status !== 202) rec.post_error = r.error || ("HTTP " + r.status);
      return r;
    });
    rec.arrive = function (data) {
      var d;
      try { d = JSON.parse(data); } catch (e) { return false; }
      if (!d || d.tag !== tag || typeof d.seq !== "number") return false;
      if (rec.arrivals.some(function (a) { return a.seq === d.seq; })) return true;
      rec.arrivals.push({ seq: d.seq, sent_ms: d.sent_ms, at_ms: Math.round(now() - rec.t0) });
      return true;
    };
    return rec;
  }

  function burstJSON(b) {
    return b ? { n: b.n, gap_ms: b.gap_ms, delay_ms: b.delay_ms, arrivals: b.arrivals, post_status: b.post_status,
      post_ms: b.post_ms, post_error: b.post_error } : null;
  }

  // ---- the page --------------------------------------------------------------------------
  var ui = {};
  ORDER.forEach(function (name) {
    var el = document.getElementById("probe-" + name);
    ui[name] = {
      el: el, bar: el.querySelector("progress"), step: el.querySelector(".step"), badge: el.querySelector(".badge"),
      reason: el.querySelector(".reason"), fix: el.querySelector(".fix"), metrics: el.querySelector(".metrics"),
      start: null, expect: 1,
    };
  });

  function begin(name, seconds) {
    var u = ui[name];
    u.start = now();
    u.expect = seconds * 1000;
    u.el.className = "probe running";
    u.badge.textContent = "testing";
  }

  function step(name, text) { ui[name].step.textContent = text; }

  // The burst each probe is timing right now, drawn as it arrives (before any verdict).
  var drawing = {};
  function watch(name, b) { drawing[name] = b; }

  var ticker = setInterval(function () {
    ORDER.forEach(function (name) {
      var u = ui[name];
      if (u.start !== null && u.el.classList.contains("running")) {
        u.bar.value = Math.min(0.97, (now() - u.start) / u.expect);
        if (drawing[name]) {
          var pic = u.el.querySelector(".picture"), svg = timeline(burstJSON(drawing[name]));
          pic.textContent = "";
          if (svg) pic.appendChild(svg);
        }
      }
    });
  }, 200);

  function finishProbe(name, text) {
    var u = ui[name];
    u.bar.value = 1;
    u.el.className = "probe measured";
    u.badge.textContent = "measured";
    u.step.textContent = text || "done; waiting for the verdict";
  }

  function showTransport(name, t, burstRaw) {
    var u = ui[name];
    var pic = u.el.querySelector(".picture");
    pic.textContent = "";
    var svg = timeline(burstRaw);
    if (svg) pic.appendChild(svg);
    u.el.className = "probe " + t.status;
    u.bar.value = 1;
    u.badge.textContent = t.status === "ok" ? "works" : t.status;
    u.step.textContent = t.ok ? "" : "verdict: " + (t.status === "broken" ? "does not work from here" : "works, with problems");
    u.reason.textContent = t.reason || "";
    if (t.fix) { u.fix.hidden = false; u.fix.textContent = "What to change: " + t.fix; } else { u.fix.hidden = true; }
    u.metrics.textContent = "";
    var labels = { latency_ms: "latency (ms)", held_s: "held (s)", cut_after_s: "cut after (s)", events: "events",
      buffered: "buffered", works_with_padding: "works with padding", heartbeats: "heartbeats",
      first_byte_ms: "first byte (ms)", close_code: "close code", requests: "requests" };
    Object.keys(labels).forEach(function (k) {
      if (t[k] === undefined || t[k] === null) return;
      var div = document.createElement("div"), dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = labels[k];
      dd.textContent = String(t[k]);
      div.appendChild(dt); div.appendChild(dd); u.metrics.appendChild(div);
    });
  }

  function showFacts(raw, verdict) {
    var f = raw.facts || {}, c = raw.client, p = verdict.path || {};
    var rows = [
      ["Your address as the server sees it", f.client_address],
      ["Page loaded over", c.protocol || "unknown"],
      ["HTTP version of the last hop to the gateway", f.http_version],
      ["Proxy in the path", p.proxy ? "yes: " + (p.evidence || []).join("; ") : "none detected"],
      ["Known platform", f.platform_limits ? f.platform_limits.name : "none recognised"],
      ["Idle connections cut after", p.idle_limit_s ? "~" + p.idle_limit_s + " s" : "not seen in this run"],
      ["Every connection closed after", p.lifetime_limit_s ? "~" + p.lifetime_limit_s + " s, busy or not" : null],
      ["Server header seen by the browser", c.response_headers && c.response_headers.server],
    ];
    Object.keys(f.headers || {}).forEach(function (h) { rows.push([h + " (seen by the server)", f.headers[h]]); });
    var body = document.querySelector("#facts tbody");
    body.textContent = "";
    rows.forEach(function (r) {
      if (r[1] === undefined || r[1] === null || r[1] === "") return;
      var tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
      th.textContent = r[0]; td.textContent = String(r[1]);
      tr.appendChild(th); tr.appendChild(td); body.appendChild(tr);
    });
    var warn = document.getElementById("warnings");
    warn.textContent = "";
    (p.warnings || []).forEach(function (w) {
      var d = document.createElement("p");
      d.className = "warning";
      d.textContent = w;
      warn.appendChild(d);
    });
  }

  // ---- probes ------------------------------------------------------------------------------
  async function probeShortPoll(ch, rec) {
    begin("short_poll", 3);
    rec.polls = [];
    var first = await call(BASE + "/poll/" + ch, {}, WAIT.request);
    rec.polls.push(pollRecord(first));
    if (!(first.status === 200 && first.json && first.json.cursor)) {
      rec.error = first.error || "HTTP " + first.status;
      return;
    }
    var cursor = first.json.cursor;
    // Ask once with the cursor before publishing: a path that caches answers (ignoring
    // Cache-Control) then serves this stale, empty answer to the polls after the publish.
    var since = BASE + "/poll/" + ch + "?since=" + encodeURIComponent(cursor);
    rec.polls.push(pollRecord(await call(since, {}, WAIT.request)));
    step("short_poll", "publishing a test event");
    var b = burst(ch, 1, 0, 0, TAGS.short_poll);
    watch("short_poll", b);
    await b.request;
    rec.event_seen = false;
    var t0 = now();
    for (var i = 0; i < PLAN.short_poll.polls && !rec.event_seen; i++) {
      step("short_poll", "polling (" + (i + 1) + ")");
      var r = await call(since, {}, WAIT.request);
      rec.polls.push(pollRecord(r));
      var events = r.json && r.json.events;
      if (Array.isArray(events) && events.some(function (e) { return b.arrive(e.data); })) {
        rec.event_seen = true;
        rec.event_latency_ms = Math.round(now() - t0);
      } else {
        await sleep(PLAN.short_poll.pause_ms);
      }
    }
    rec.burst = burstJSON(b);
  }

  function pollRecord(r) {
    return { status: r.status, ms: r.ms, error: r.error,
      json: !!(r.json && Array.isArray(r.json.events)), events: r.json && r.json.events ? r.json.events.length : null };
  }

  async function probeLongPoll(ch, rec, cap) {
    var hold = Math.max(1, Math.min(HOLD, cap));
    rec.hold_s = hold;
    begin("long_poll", hold + 1);
    step("long_poll", "holding a request for " + hold + " s and publishing one event during another");
    var deadline = hold * 1000 + WAIT.hold_slack, delay = PLAN.long_poll.event_delay_ms;
    var idleP = (async function () {
      var t0 = now(), url = BASE + "/longpoll/" + ch + ".idle?since=0-0&timeout=" + hold;
      var r = await call(url, {}, deadline);
      rec.idle = { status: r.status, error: r.error, elapsed_s: Math.round(now() - t0) / 1000,
        json: !!(r.json && Array.isArray(r.json.events)), events: r.json && r.json.events ? r.json.events.length : null };
      if (!(r.status === 200 && r.json && Array.isArray(r.json.events))) return;
      // The same URL again after a publish: a path that caches answers (ignoring Cache-Control)
      // replays the empty one at once, and clients re-asking with one cursor never see events.
      step("long_poll", "asking again with the same cursor after a publish");
      var b = burst(ch + ".idle", 1, 0, 0, TAGS.long_poll_repeat);
      await b.request;
      var again = await call(url, {}, WAIT.request);
      var events = (again.json && again.json.events) || [];
      rec.repeat = { status: again.status, error: again.error, json: !!(again.json && Array.isArray(again.json.events)),
        arrived: Array.isArray(events) && events.some(function (e) { return b.arrive(e.data); }),
        published: b.post_status === 202 };
    })();
    var evP = (async function () {
      var evCh = ch + ".event";
      var pending = call(BASE + "/longpoll/" + evCh + "?since=0-0&timeout=" + hold, {}, deadline);
      var b = burst(evCh, 1, 0, delay, TAGS.long_poll);
      watch("long_poll", b);
      var r = await pending;
      var events = (r.json && r.json.events) || [];
      var arrived = Array.isArray(events) && events.some(function (e) { return b.arrive(e.data); });
      await b.request;
      rec.event = { status: r.status, error: r.error, arrived: arrived, json: !!(r.json && Array.isArray(r.json.events)),
        latency_ms: arrived ? Math.max(0, b.arrivals[0].at_ms - delay) : null };
      rec.burst = burstJSON(b);
      if (!arrived && b.post_error) rec.event.error = "publishing the test event failed: " + b.post_error;
    })();
    await Promise.all([idleP, evP]);
  }

  /* Read an SSE body: calls onBytes for the first byte, onEvent({id,event,data}), onComment(text). */
  async function readSSE(body, h) {
    var reader = body.getReader(), decoder = new TextDecoder(), buf = "", ev = { data: [] };
    h.reader = reader;
    for (;;) {
      var chunk = await reader.read();
      if (chunk.done) return;
      if (h.onBytes) h.onBytes();
      buf += decoder.decode(chunk.value, { stream: true });
      var lines = buf.split(/\r\n|\r|\n/);
      buf = lines.pop();
      lines.forEach(function (line) {
        if (line === "") {
          if (ev.data.length) h.onEvent({ id: ev.id, event: ev.event || "message", data: ev.data.join("\n") });
          ev = { data: [] };
        } else if (line.charAt(0) === ":") {
          h.onComment(line.slice(1));
        } else {
          var i = line.indexOf(":"), field = i < 0 ? line : line.slice(0, i);
          var value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          if (field === "data") ev.data.push(value);
          else if (field === "id") ev.id = value;
          else if (field === "event") ev.event = value;
        }
      });
    }
  }

  /* Open one SSE stream; returns a handle with its timings and events. */
  function openSSE(url, headers, maxMs) {
    var s = { ctrl: new AbortController(), t0: now(), events: [], heartbeats: 0, ended: null, error: null,
      status: null, content_type: null, headers_ms: null, first_byte_ms: null, last_byte: null, handlers: [] };
    var timer = setTimeout(function () { s.ctrl.abort(); }, maxMs);
    s.done = (async function () {
      try {
        var resp = await fetch(url, { headers: Object.assign({ Accept: "text/event-stream" }, headers || {}),
          cache: "no-store", signal: s.ctrl.signal });
        s.status = resp.status;
        s.content_type = resp.headers.get("content-type");
        s.headers_ms = Math.round(now() - s.t0);
        if (resp.status !== 200 || !/text\/event-stream/.test(s.content_type || "") || !resp.body) {
          s.error = resp.status !== 200 ? "HTTP " + resp.status : "not an event stream";
          try {
            var body = JSON.parse(await resp.text());
            if (body && typeof body.error === "string") s.error_code = body.error.slice(0, 60);
          } catch (e) { /* not the gateway's JSON */ }
          return;
        }
        await readSSE(resp.body, {
          onBytes: function () {
            s.last_byte = now();
            if (s.first_byte_ms === null) s.first_byte_ms = Math.round(s.last_byte - s.t0);
          },
          onEvent: function (e) { s.events.push(e); s.handlers.forEach(function (f) { f(e); }); },
          onComment: function (c) { if (/heartbeat/.test(c)) s.heartbeats++; },
        });
      } catch (e) {
        if (!s.closedByUs) s.error = errText(e);
      } finally {
        clearTimeout(timer);
        if (s.ended === null) s.ended = now();
      }
    })();
    s.close = function () { s.closedByUs = true; s.ctrl.abort(); };
    s.isOpen = function () { return s.ended === null || s.closedByUs; };
    return s;
  }

  /* Wait (a bounded while) for the stream's headers before timing a burst over it: a path slow
   * to answer (proxy auth, a slow first byte) would otherwise read as one that buffers events.
   * A path that holds back the headers themselves still gets its burst after OPEN_WAIT_MS. */
  function untilOpen(s) {
    return waitFor(function () { return s.status !== null || s.ended !== null; }, WAIT.open);
  }

  async function probeSSE(ch, rec, heartbeat) {
    begin("sse", HOLD + 4);
    rec.hold_s = HOLD;
    rec.heartbeat_s = heartbeat;
    step("sse", "opening the stream and sending a timed burst of " + BURST_N + " events");
    var s = openSSE(BASE + "/sse/" + ch + "?since=0-0", null, HOLD * 1000 + WAIT.hold_slack);
    await untilOpen(s);
    var b = burst(ch, BURST_N, BURST_GAP, 0, TAGS.stream);
    watch("sse", b);
    s.handlers.push(function (e) { b.arrive(e.data); });
    await waitFor(function () { return b.arrivals.length >= BURST_N || s.ended !== null; },
      BURST_N * BURST_GAP + WAIT.burst_slack);
    step("sse", "holding the stream open, idle, until " + HOLD + " s");
    await waitFor(function () { return s.ended !== null; }, s.t0 + HOLD * 1000 - now());
    if (s.ended === null && b.arrivals.length) {
      step("sse", "checking the stream still delivers");
      var alive = burst(ch, 1, 0, 0, TAGS.alive);
      s.handlers.push(function (e) { alive.arrive(e.data); });
      var got = await waitFor(function () { return alive.arrivals.length > 0 || s.ended !== null; }, WAIT.alive);
      rec.alive = { arrived: !!(got && alive.arrivals.length),
        latency_ms: alive.arrivals.length ? alive.arrivals[0].at_ms : null };
    } else if (s.ended !== null) {
      rec.ended_after_s = Math.round(s.ended - s.t0) / 1000;
      rec.idle_before_end_s = Math.round(s.ended - (s.last_byte || s.t0)) / 1000;
    }
    s.close();
    Object.assign(rec, { status: s.status, content_type: s.content_type, headers_ms: s.headers_ms,
      first_byte_ms: s.first_byte_ms, heartbeats: s.heartbeats, error: s.error, burst: burstJSON(b) });
    // What reached the gateway: tells "held back on the way" from "never arrived".
    rec.seen = await seenFor(ch);
    // Resume: reconnect with Last-Event-ID and compare with what a poll says came after it,
    // and whether initial padding changes how events arrive (both at once; the verdict reads it
    // only where events were held back).
    var checks = [];
    var withIds = s.events.filter(function (e) { return e.id && e.event !== "gap"; });
    if (withIds.length) {
      step("sse", "reconnecting with Last-Event-ID");
      checks.push(resumeCheck(ch, withIds[0].id).then(function (r) { rec.resume = r; }));
    }
    step("sse", "trying again with " + PADDING + " bytes of padding");
    checks.push(paddingCheck(ch + ".pad").then(function (r) { rec.padding = r; }));
    await Promise.all(checks);
  }

  async function resumeCheck(ch, lastId) {
    var expect = await call(BASE + "/poll/" + ch + "?since=" + encodeURIComponent(lastId), {}, WAIT.seen);
    var want = (expect.json && expect.json.events || []).map(function (e) { return e.id; });
    var s = openSSE(BASE + "/sse/" + ch, { "Last-Event-ID": lastId }, WAIT.resume + 2000);
    await waitFor(function () { return s.events.length >= want.length || s.ended !== null; }, WAIT.resume);
    s.close();
    var got = s.events.map(function (e) { return e.event === "gap" ? "gap" : e.id; }).slice(0, want.length);
    var ok = want.length > 0 && got.join(",") === want.join(",");
    var out = { ok: ok, expected: want.length, received: got.length, gap: got.indexOf("gap") >= 0 };
    if (!want.length) out.error = "could not list the events to expect (" + (expect.error || "HTTP " + expect.status) + ")";
    else if (!ok) out.error = got.length ? "got different events than were missed" : "no missed events came back";
    return out;
  }

  async function paddingCheck(ch) {
    var s = openSSE(BASE + "/sse/" + ch + "?since=0-0&padding=" + PADDING, null,
      BURST_N * BURST_GAP + WAIT.padding_slack);
    await untilOpen(s);
    var b = burst(ch, BURST_N, BURST_GAP, 0, TAGS.stream);
    s.handlers.push(function (e) { b.arrive(e.data); });
    await waitFor(function () { return b.arrivals.length >= BURST_N || s.ended !== null; },
      BURST_N * BURST_GAP + WAIT.burst_slack);
    s.close();
    return { bytes: PADDING, status: s.status, first_byte_ms: s.first_byte_ms, error: s.error, burst: burstJSON(b) };
  }

  async function probeWebSocket(ch, rec) {
    begin("websocket", HOLD + 3);
    rec.hold_s = HOLD;
    rec.opened = false;
    step("websocket", "opening");
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + BASE + "/ws/" + ch;
    var t0 = now(), ws, closedAt = null, echoes = {}, b = null, lastFrame = null;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      rec.error = errText(e);
    }
    if (ws) {
      var opened = await new Promise(function (resolve) {
        var timer = setTimeout(function () { rec.error = "no handshake in time"; resolve(false); }, WAIT.handshake);
        ws.onopen = function () { clearTimeout(timer); resolve(true); };
        ws.onerror = function () { rec.error = rec.error || "the handshake failed"; };
        ws.onclose = function (ev) {
          closedAt = now();
          rec.close_code = ev.code;
          rec.close_reason = (ev.reason || "").slice(0, 120);
          clearTimeout(timer);
          resolve(false);
        };
      });
      ws.onmessage = function (m) {
        lastFrame = now();
        var e;
        try { e = JSON.parse(m.data); } catch (x) { return; }
        if (e.event === "echo" && echoes[e.data]) echoes[e.data].back = now();
        else if (b && e.event === TAGS.stream) b.arrive(e.data);
      };
      if (opened) {
        rec.opened = true;
        rec.open_ms = Math.round(now() - t0);
        var echo = function (label, ms) {
          var e = echoes[label] = { sent: now(), back: null };
          try { ws.send(JSON.stringify({ event: "echo", data: label })); } catch (x) { return Promise.resolve(e); }
          return waitFor(function () { return e.back !== null || closedAt !== null; }, ms).then(function () { return e; });
        };
        step("websocket", "sending a message up and a timed burst down");
        // Both directions at once: the echo round trip and the server's burst share one deadline.
        var e1P = echo("echo-1", WAIT.echo);
        b = burst(ch, BURST_N, BURST_GAP, 0, TAGS.stream);
        watch("websocket", b);
        var e1 = await e1P;
        rec.echo = { arrived: e1.back !== null, rtt_ms: e1.back !== null ? Math.round(e1.back - e1.sent) : null };
        await waitFor(function () { return b.arrivals.length >= BURST_N || closedAt !== null; },
          BURST_N * BURST_GAP + WAIT.burst_slack - (now() - b.t0));
        step("websocket", "holding the connection open, idle, until " + HOLD + " s");
        await waitFor(function () { return closedAt !== null; }, t0 + HOLD * 1000 - now());
        if (closedAt === null && (e1.back !== null || b.arrivals.length)) {
          var e2 = await echo("echo-2", WAIT.alive);
          rec.alive = { arrived: e2.back !== null, rtt_ms: e2.back !== null ? Math.round(e2.back - e2.sent) : null };
        }
        if (closedAt !== null) {
          rec.closed_after_s = Math.round(closedAt - t0) / 1000;
          rec.idle_before_close_s = Math.round(closedAt - (lastFrame || t0)) / 1000;
        }
        rec.burst = burstJSON(b);
      }
      try { ws.onclose = null; ws.close(1000); } catch (x) { /* ignore */ }
    }
    // What reached the gateway for this channel: explains a failed handshake.
    rec.seen = await seenFor(ch);
    if (!rec.opened) {
      var plain = await call(BASE + "/ws/" + ch, {}, WAIT.seen);
      rec.http_status = plain.status;
      if (plain.json && plain.json.error) rec.http_error = plain.json.error;
    }
  }

  /* What reached the gateway on a channel (Upgrade header, the gateway's answer...). */
  async function seenFor(ch) {
    var seen = await call(BASE + "/diagnose/seen?channel=" + encodeURIComponent(ch), {}, WAIT.seen);
    return seen.json && seen.json.requests || [];
  }

  // ---- real channels: what a page of this site gets on a channel with no exemption ----------
  function realUrl(path, query) {
    var q = [query, TOKEN ? "token=" + encodeURIComponent(TOKEN) : ""].filter(Boolean).join("&");
    return path + (q ? "?" + q : "");
  }

  function answerRecord(r) {
    return { status: r.status, error: (r.json && typeof r.json.error === "string" ? r.json.error : r.error) || null };
  }

  async function probeReal(real) {
    var ch = PLAN.channels.real_prefix + randomId();
    real.channel = ch;
    var poll = call(realUrl(BASE + "/poll/" + ch, ""), {}, WAIT.real).then(function (r) {
      real.short_poll = answerRecord(r);
    });
    var longPoll = call(realUrl(BASE + "/longpoll/" + ch, "timeout=0"), {}, WAIT.real).then(function (r) {
      real.long_poll = answerRecord(r);
    });
    var sse = (async function () {
      var s = openSSE(realUrl(BASE + "/sse/" + ch, ""), null, WAIT.real);
      await untilOpen(s);
      s.close();
      real.sse = { status: s.status, error: s.error_code || (s.status === 200 ? null : s.error) };
    })();
    var ws = (async function () {
      var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + realUrl(BASE + "/ws/" + ch, "");
      var rec = real.websocket = { opened: false, close_code: null };
      var sock;
      try { sock = new WebSocket(url); } catch (e) { rec.error = errText(e); return; }
      rec.opened = await new Promise(function (resolve) {
        var timer = setTimeout(function () { resolve(false); }, WAIT.handshake);
        sock.onopen = function () { clearTimeout(timer); resolve(true); };
        sock.onerror = function () { /* the close event says the rest */ };
        sock.onclose = function (ev) { clearTimeout(timer); rec.close_code = ev.code; resolve(false); };
      });
      try { sock.onclose = null; sock.close(1000); } catch (e) { /* ignore */ }
      // A browser never shows a refused handshake's status: ask what the gateway answered.
      if (!rec.opened) rec.seen = await seenFor(ch);
    })();
    await Promise.all([poll, longPoll, sse, ws]);
  }

  // ---- pictures -------------------------------------------------------------------------------
  var SVG = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs, text) {
    var el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (text) el.textContent = text;
    return el;
  }

  /* The burst as a timeline: when each event was due to be sent (top) and when it arrived
   * (bottom), joined by a line. Spaced lines are live delivery; lines converging on one point
   * are a buffer releasing events together. */
  function timeline(b) {
    if (!b || !b.n) return null;
    var arrivals = (b.arrivals || []).slice().sort(function (x, y) { return x.seq - y.seq; });
    var due = function (seq) { return (b.delay_ms || 0) + seq * (b.gap_ms || 0); };
    var end = Math.max(due(b.n - 1), 1);
    arrivals.forEach(function (a) { end = Math.max(end, a.at_ms); });
    end = end * 1.08 + 50;
    var W = 460, L = 62, R = 12, x = function (ms) { return L + (W - L - R) * ms / end; };
    var svg = svgEl("svg", { viewBox: "0 0 " + W + " 64", width: W, height: 64, role: "img", class: "timeline" });
    svg.appendChild(svgEl("title", {}, "sent vs arrived: " + arrivals.length + " of " + b.n + " events arrived"));
    svg.appendChild(svgEl("text", { x: 0, y: 16, class: "lbl" }, "sent"));
    svg.appendChild(svgEl("text", { x: 0, y: 48, class: "lbl" }, "arrived"));
    svg.appendChild(svgEl("line", { x1: L, y1: 12, x2: W - R, y2: 12, class: "axis" }));
    svg.appendChild(svgEl("line", { x1: L, y1: 44, x2: W - R, y2: 44, class: "axis" }));
    for (var seq = 0; seq < b.n; seq++) {
      svg.appendChild(svgEl("circle", { cx: x(due(seq)), cy: 12, r: 3.5, class: "sent" }));
    }
    arrivals.forEach(function (a) {
      svg.appendChild(svgEl("line", { x1: x(due(a.seq)), y1: 12, x2: x(a.at_ms), y2: 44, class: "link" }));
      svg.appendChild(svgEl("circle", { cx: x(a.at_ms), cy: 44, r: 3.5, class: "arrived" }));
    });
    svg.appendChild(svgEl("text", { x: L, y: 62, class: "lbl" }, "0"));
    svg.appendChild(svgEl("text", { x: W - R, y: 62, class: "lbl end" }, Math.round(end) + " ms"));
    return svg;
  }

  // ---- the run -------------------------------------------------------------------------------
  async function collect(raw) {
    var base = PLAN.channels.probe_prefix + randomId(), sfx = PLAN.suffixes;
    var facts = await call(BASE + "/diagnose/facts", {}, WAIT.facts);
    raw.facts = facts.json || { error: facts.error || "HTTP " + facts.status };
    if (facts.headers) {
      ["server", "via", "x-cache", "cf-ray", "age", "x-served-by"].forEach(function (h) {
        var v = facts.headers.get(h);
        if (v) raw.client.response_headers[h] = v.slice(0, 200);
      });
    }
    var gw = (facts.json && facts.json.gateway) || {};
    var cap = Number(gw.longpoll_max_timeout_s) || 25;
    ORDER.forEach(function (n) { raw.probes[n] = {}; });
    function guarded(name, fn) {
      return fn().catch(function (e) { raw.probes[name].error = errText(e); })
        .then(function () { finishProbe(name); });
    }
    raw.real = {};
    await Promise.all([
      guarded("websocket", function () { return probeWebSocket(base + sfx.websocket, raw.probes.websocket); }),
      guarded("sse", function () {
        return probeSSE(base + sfx.sse, raw.probes.sse, Number(gw.sse_heartbeat_s) || null);
      }),
      guarded("long_poll", function () { return probeLongPoll(base + sfx.long_poll, raw.probes.long_poll, cap); }),
      guarded("short_poll", function () { return probeShortPoll(base + sfx.short_poll, raw.probes.short_poll); }),
      probeReal(raw.real).catch(function (e) { raw.real.error = errText(e); }),
    ]);
  }

  async function run() {
    var nav = performance.getEntriesByType && performance.getEntriesByType("navigation")[0];
    var raw = {
      version: 1, plan_version: PLAN.version, mode: CONFIG.mode, hold_s: HOLD, started: new Date().toISOString(),
      facts: null, probes: {},
      client: { agent: "browser", user_agent: navigator.userAgent, host: location.host, secure: location.protocol === "https:",
        protocol: nav && nav.nextHopProtocol || null, response_headers: {}, token: !!TOKEN },
    };
    window.__diagnoseRaw = raw;
    document.getElementById("rerun").disabled = true;
    var hardStop = sleep(HOLD * 1000 + WAIT.run_slack).then(function () { raw.timed_out = true; });
    try {
      await Promise.race([collect(raw), hardStop]);
    } catch (e) {
      raw.error = errText(e);
    }
    raw.min_rtt_ms = MIN_RTT;
    var verdict = null, r = null;
    try {
      r = await call(BASE + "/diagnose/verdict", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(raw) }, WAIT.request);
      if (r.status === 200 && r.json && r.json.transports) verdict = r.json;
    } catch (e) { /* below */ }
    if (!verdict) {
      // There is one verdict and it is the gateway's: without it, say so rather than guess.
      var why = r ? (r.error || "HTTP " + r.status) : "no answer";
      verdict = { transports: {}, recommended: null, fallback: null, source: "none", error: why,
        summary: "The measurements are done, but the gateway's verdict could not be fetched (" + why + "): " +
          "something on the path refuses POST /diagnose/verdict. Copy the raw results below to get it elsewhere." };
      ORDER.forEach(function (n) {
        verdict.transports[n] = { ok: false, status: "broken", reason: "no verdict: " + why, findings: ["no_verdict"] };
      });
      verdict.transports.sse.buffered = false;
      verdict.raw = JSON.parse(JSON.stringify(raw));  // plain data, as #diagnosis-json shows it
    }
    verdict.started = raw.started;
    publish(raw, verdict);
  }

  function publish(raw, verdict) {
    clearInterval(ticker);
    window.__diagnosis = verdict;
    var text = JSON.stringify(verdict, null, 2);
    document.getElementById("diagnosis-json").textContent = text;
    try {
      ORDER.forEach(function (n) {
        if (verdict.transports[n]) showTransport(n, verdict.transports[n], (raw.probes[n] || {}).burst);
      });
      showFacts(raw, verdict);
      var names = { websocket: "WebSocket", sse: "Server-Sent Events", long_poll: "long polling", short_poll: "short polling" };
      var box = document.getElementById("overall");
      box.className = "overall " + (verdict.recommended === "websocket" || verdict.recommended === "sse" ? "good"
        : verdict.recommended ? "warn" : "bad");
      document.getElementById("summary").textContent = verdict.summary || "Done.";
      document.getElementById("recommendation").textContent = verdict.recommended
        ? "Recommended from here: " + names[verdict.recommended] + "."
        : "No method works cleanly from here" + (verdict.fallback ? "; the best of the rest is " + names[verdict.fallback] : "") + ".";
    } finally {
      var copy = document.getElementById("copy-json");
      copy.disabled = false;
      document.getElementById("rerun").disabled = false;
      document.dispatchEvent(new CustomEvent("diagnosis", { detail: verdict }));
    }
  }

  document.getElementById("copy-json").addEventListener("click", function () {
    var text = document.getElementById("diagnosis-json").textContent, status = document.getElementById("copy-status");
    var done = function (ok) { status.textContent = ok ? "copied" : "select the text below and copy it"; };
    if (navigator.clipboard && navigator.clipboard.writeText) navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(false); });
    else done(false);
  });
  document.getElementById("rerun").addEventListener("click", function () { location.reload(); });

  run();
})();
