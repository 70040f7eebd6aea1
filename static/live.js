/*
 * live.js: the live view. One GatewayClient per transport (each pinned to that transport alone) reads
 * the same channel from the same cursor; each column shows latency and what the transport costs.
 * Under the figures, a chart of each transport's latency over the last minute (inline SVG).
 * The state is also kept in window.__live for tests and the curious.
 */
(function () {
  "use strict";

  var opts = JSON.parse(document.getElementById("live-options").textContent);
  var NAMES = GatewayClient.transports;
  var KEEP = 500; // ids and latencies kept per column
  var SHOWN = 15; // rows listed per column
  var WINDOW_MS = 60000; // the chart's span: the last minute
  var live = { channel: opts.channel, transports: {} };
  var firstArrival = {};
  var firstOrder = [];
  var clients = {};
  window.__live = live;

  NAMES.forEach(function (name) {
    live.transports[name] = { state: "starting", reason: null, ids: [], latencies: [], behind: [], stats: null,
      points: [] };
  });

  // One cursor for all four, so the columns list the same events.
  fetch("/poll/" + encodeURIComponent(opts.channel), { cache: "no-store" })
    .then(function (r) { return r.ok ? r.json() : {}; })
    .catch(function () { return {}; })
    .then(function (body) {
      NAMES.forEach(function (name) { clients[name] = start(name, body.cursor || null); });
      live.started = true;
    });
  setInterval(renderAll, 1000);

  function start(name, since) {
    return new GatewayClient("", opts.channel, {
      transports: [name],
      since: since,
      pollIntervalMs: opts.pollIntervalMs,
      longPollTimeoutS: opts.longPollTimeoutS,
      onEvent: function (ev) { arrived(name, ev); },
      onGap: function () { note(name, "history was lost here (gap): some events are missing"); },
      onStatus: function (s) {
        var col = live.transports[name];
        col.state = s.state;
        col.reason = s.reason && s.state !== "open" ? s.reason : null;
        render(name);
      }
    });
  }

  function arrived(name, ev) {
    var at = Date.now();
    var col = live.transports[name];
    if (!(ev.id in firstArrival)) {
      firstArrival[ev.id] = at;
      firstOrder.push(ev.id);
      if (firstOrder.length > KEEP * 4) delete firstArrival[firstOrder.shift()];
    }
    var sent = publishedAt(ev);
    var latency = sent === null ? null : at - sent;
    var behind = at - firstArrival[ev.id];
    push(col.ids, ev.id);
    push(col.latencies, latency);
    push(col.behind, behind);
    if (latency !== null) push(col.points, [at, latency]);
    col.rows = col.rows || [];
    col.rows.unshift({ id: ev.id, event: ev.event, latency: latency, behind: behind });
    col.rows.length = Math.min(col.rows.length, SHOWN);
    render(name);
  }

  // The publish time: a timestamp in the event's JSON data if it has one, else the id's clock part.
  function publishedAt(ev) {
    var data = null;
    try { data = JSON.parse(ev.data); } catch (e) { /* not JSON: fall back to the id */ }
    if (data && typeof data === "object") {
      var keys = ["time", "ts", "timestamp", "sent_at", "published_at"];
      for (var i = 0; i < keys.length; i++) {
        var v = data[keys[i]];
        if (typeof v === "number" && isFinite(v)) {
          if (v > 1e12) return v; // milliseconds
          if (v > 1e9) return v * 1000; // seconds
        } else if (typeof v === "string" && !isNaN(Date.parse(v))) {
          return Date.parse(v);
        }
      }
    }
    var m = /^(\d+)-\d+$/.exec(ev.id);
    return m ? Number(m[1]) : null;
  }

  function note(name, text) {
    live.transports[name].reason = text;
    render(name);
  }

  function push(list, value) {
    list.push(value);
    if (list.length > KEEP) list.shift();
  }

  function renderAll() { NAMES.forEach(render); }

  function render(name) {
    var col = live.transports[name];
    var client = clients[name];
    var el = document.getElementById("col-" + name);
    if (!el) return;
    col.stats = client ? client.stats[name] : null;
    var st = col.stats || { requests: 0, frames: 0, events: 0, bytes: 0 };
    var lat = col.latencies.filter(function (x) { return x !== null; });
    set(el, "state", col.state, "state state-" + col.state);
    set(el, "reason", col.reason || "");
    set(el, "events", String(col.ids.length));
    set(el, "latency", lat.length ? ms(lat[lat.length - 1]) : "\u2013");
    set(el, "avg", lat.length ? ms(avg(lat)) : "\u2013");
    set(el, "behind", col.behind.length ? ms(avg(col.behind)) + " avg" : "\u2013");
    set(el, "requests", String(st.requests));
    set(el, "frames", String(st.frames));
    set(el, "bytes", bytes(st.bytes));
    set(el, "per_event", col.ids.length ? bytes(st.bytes / col.ids.length) : "\u2013");
    chart(el.querySelector('[data-k="chart"]'), col.points);
    var list = el.querySelector('[data-k="list"]');
    list.textContent = "";
    (col.rows || []).forEach(function (row) {
      var li = document.createElement("li");
      var left = document.createElement("span");
      left.textContent = row.id + " " + row.event;
      var right = document.createElement("span");
      right.textContent = row.latency === null ? "" : ms(row.latency);
      li.appendChild(left);
      li.appendChild(right);
      list.appendChild(li);
    });
  }

  /* Latency of each event over the last minute: time along, milliseconds up (scale to the
   * largest shown, at least 100 ms), one dot per event, joined by a line. */
  var SVG = "http://www.w3.org/2000/svg";
  function chart(box, points) {
    if (!box) return;
    var now = Date.now(), W = 270, H = 80, L = 48, B = 14;
    var shown = points.filter(function (p) { return now - p[0] <= WINDOW_MS; });
    var top = Math.max(100, Math.max.apply(null, shown.map(function (p) { return p[1]; }).concat([0])) * 1.1);
    var x = function (t) { return L + (W - L - 4) * (1 - (now - t) / WINDOW_MS); };
    var y = function (v) { return 4 + (H - B - 4) * (1 - Math.max(0, v) / top); };
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", class: "chart" });
    svg.appendChild(el("title", {}, "latency over the last minute: " + shown.length + " events"));
    svg.appendChild(el("line", { x1: L, y1: H - B, x2: W - 4, y2: H - B, class: "axis" }));
    svg.appendChild(el("line", { x1: L, y1: 4, x2: L, y2: H - B, class: "axis" }));
    svg.appendChild(el("text", { x: L - 3, y: 12, class: "lbl end" }, Math.round(top) + " ms"));
    svg.appendChild(el("text", { x: L - 3, y: H - B, class: "lbl end" }, "0"));
    svg.appendChild(el("text", { x: L, y: H - 2, class: "lbl" }, "-60 s"));
    svg.appendChild(el("text", { x: W - 4, y: H - 2, class: "lbl end" }, "now"));
    if (shown.length > 1) {
      svg.appendChild(el("polyline", { class: "line", points: shown.map(function (p) {
        return x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1);
      }).join(" ") }));
    }
    shown.forEach(function (p) { svg.appendChild(el("circle", { cx: x(p[0]), cy: y(p[1]), r: 2, class: "dot" })); });
    box.textContent = "";
    box.appendChild(svg);
  }

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text) node.textContent = text;
    return node;
  }

  function set(el, key, text, className) {
    var node = el.querySelector('[data-k="' + key + '"]');
    node.textContent = text;
    if (className) node.className = className;
  }

  function avg(list) {
    var sum = 0;
    for (var i = 0; i < list.length; i++) sum += list[i];
    return sum / list.length;
  }

  function ms(x) { return Math.round(x) + " ms"; }

  function bytes(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(1) + " MB";
    if (n >= 1024) return (n / 1024).toFixed(1) + " KB";
    return Math.round(n) + " B";
  }
})();
