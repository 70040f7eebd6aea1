/*
 * gateway-client.js: read channels of the transport gateway over whichever transport gets through.
 *
 *   var client = new GatewayClient("https://gw.example", "prices", {   // or ["prices", "news"]
 *     onEvent: function (ev, transport) { ... },        // ev = {id, event, data, channel}, each exactly once, in order
 *     onGap: function (info, transport) { ... },        // history was lost between two events: resync your state
 *     onStatus: function (s) { ... },                   // {state, transport, reason, delayMs}
 *     transports: ["websocket", "sse", "long_poll", "short_poll"],  // the order to try them in
 *     token: "jwt" or function () { return "jwt" or a Promise of one }   // for private channels
 *   });
 *   client.setChannels(["prices", "news"]);  // a Promise; on a WebSocket without reconnecting
 *   client.close();
 *
 * It tries each transport in turn and moves on by itself when one is refused, fails before working,
 * or stalls (a WebSocket that opened but passes no events, an SSE stream whose heartbeats stop).
 * A connection that worked and then dropped is reconnected on the same transport. Every request
 * resumes from the last id seen, so no event is lost or delivered twice across reconnects and
 * fallbacks. After the last transport it starts again from the first with capped, jittered backoff.
 * With several channels, one connection carries them all and one opaque cursor (lastId) resumes
 * every one of them. A refusal (401/403) stops it with status "unauthorized"/"forbidden".
 * Plain ES5 + fetch streams, no build step, no dependencies. static/gateway.mjs builds on it.
 */
(function (root) {
  "use strict";

  var ORDER = ["websocket", "sse", "long_poll", "short_poll"];
  var DEFAULTS = {
    transports: ORDER,
    since: null, // resume after this id; null: from now
    sinceOf: null, // the channel whose own id "since" is, when it came from a one-channel connection
    stallMs: 35000, // silence after which a stream is checked: longer than the gateway's heartbeat (15 s)
    graceMs: 3000, // WebSocket: time for events the channel has to arrive once we know they exist
    connectTimeoutMs: 10000, // handshake, first SSE byte
    longPollTimeoutS: 25,
    pollIntervalMs: 2000,
    backoffMs: 500,
    maxBackoffMs: 30000,
    upgradeAfterMs: 60000, // on a fallback, retry a better transport that worked earlier after this long
    token: null, // a string, or a function returning one (or a Promise of one), asked before each connect
    onEvent: null,
    onGap: null,
    onStatus: null,
    onCursor: null // called with lastId whenever it moves (static/gateway.mjs relays it between tabs)
  };
  var SEEN_MAX = 1024; // ids remembered to drop duplicates without comparing opaque ids

  function GatewayClient(baseUrl, channel, options) {
    if (!(this instanceof GatewayClient)) return new GatewayClient(baseUrl, channel, options);
    var opts = {};
    var key;
    for (key in DEFAULTS) opts[key] = DEFAULTS[key];
    for (key in options || {}) opts[key] = options[key];
    opts.transports = (opts.transports || ORDER).filter(function (t) { return ORDER.indexOf(t) >= 0; });
    if (!opts.transports.length) throw new Error("GatewayClient: no known transport in " + options.transports);
    this.options = opts;
    this.channels = channelList(channel);
    this.channel = this.channels.join(",");
    this.base = httpBase(baseUrl);
    this.lastId = opts.since || null;
    this.longPollHoldS = opts.longPollTimeoutS; // shortened when a proxy cuts held requests
    this.transport = null;
    this.state = "idle";
    this.stats = {};
    for (var i = 0; i < ORDER.length; i++) this.stats[ORDER[i]] = { requests: 0, frames: 0, events: 0, bytes: 0 };
    this._seen = Object.create(null);
    this._seenOrder = [];
    this._gen = 0; // bumped on every (re)connect: callbacks of an older attempt are ignored
    this._index = 0;
    this._round = 0;
    this._drops = 0;
    this._worked = Object.create(null); // transports that have worked in this session
    this._upgradeWait = opts.upgradeAfterMs;
    this._upgradeTimer = null;
    this._upgrading = false;
    this._closed = false;
    this._active = null;
    this._timer = null;
    this._cursorOf = opts.since ? opts.sinceOf || this._single() : null;
    this._token = null; // the token of the current connection
    this._authRetried = false; // a token function gets one more chance after a 401
    this._waiters = []; // setChannels() Promises waiting for the next open connection
    if (this.channels.length) this._start();
    else this._status("idle", null, "no channels");
  }

  GatewayClient.transports = ORDER.slice();

  GatewayClient.prototype.close = function () {
    if (this._closed) return;
    this._closed = true;
    this._gen++;
    clearTimeout(this._timer);
    clearTimeout(this._upgradeTimer);
    if (this._active) this._active.close();
    this._settle(new Error("GatewayClient: closed"));
    this._status("closed", this.transport, "closed by the application");
  };

  // -- lifecycle ------------------------------------------------------------------------------
  GatewayClient.prototype._start = function () {
    var self = this;
    if (this.lastId !== null) return this._connect();
    // Learn the channel's cursor first, so whichever transport ends up working starts at the same place.
    this._status("connecting", null, "reading the channel's cursor");
    var gen = ++this._gen;
    var again = function () { self._start(); };
    this._withToken(gen, function () {
      request(self, self.base + "/poll/" + self._path(), self.options.connectTimeoutMs, null).then(
        function (body) {
          if (gen !== self._gen || self._closed) return;
          if (self.lastId === null && typeof body.cursor === "string") self._setCursor(body.cursor, self._single());
          self._connect();
        },
        function (err) {
          if (gen !== self._gen || self._closed) return;
          if (err.fatal) return self._fatal(err.message, err, function () { self._start(); });
          self._connect(); // the transports start "from now" on their own
        }
      );
    }, again);
  };

  // Resolve the token option (a string, a function, a Promise) into this._token, then go on.
  GatewayClient.prototype._withToken = function (gen, then, again) {
    var self = this;
    var source = this.options.token;
    if (typeof source !== "function") {
      this._token = source || null;
      return then();
    }
    var value;
    try {
      value = source();
    } catch (e) {
      value = root.Promise ? root.Promise.reject(e) : null;
    }
    var done = function (token) {
      if (gen !== self._gen || self._closed) return;
      self._token = token ? String(token) : null;
      then();
    };
    if (value && typeof value.then === "function") {
      value.then(done, function (e) {
        if (gen !== self._gen || self._closed) return;
        // The app could not mint a token (its own server down?): try again after a backoff, on
        // the same transport (no transport is to blame).
        var delay = jitter(Math.min(self.options.maxBackoffMs, self.options.backoffMs * Math.pow(2, self._drops)));
        self._drops++;
        self._status("retry", self.transport, "the token function failed: " + (e && e.message), delay);
        clearTimeout(self._timer);
        self._timer = setTimeout(again, delay);
      });
    } else {
      done(value);
    }
  };

  GatewayClient.prototype._connect = function () {
    if (this._closed) return;
    var self = this;
    var gen = ++this._gen;
    this.transport = this.options.transports[this._index];
    this._status("connecting", this.transport, null);
    this._withToken(gen, function () {
      if (self.lastId && self._cursorOf && self._multi()) self._rebase(gen, function () { self._open(gen); });
      else self._open(gen);
    }, function () { self._connect(); });
  };

  GatewayClient.prototype._open = function (gen) {
    var self = this;
    var name = this.options.transports[this._index];
    var attempt = { opened: false, healthy: false, started: now(), upgrade: this._upgrading };
    var single = this._single(); // the channel whose own ids are this connection's cursor, if one
    this._upgrading = false;
    var handle = {
      name: name,
      stats: this.stats[name],
      alive: function () { return gen === self._gen && !self._closed; },
      // Connected (shown as "open"); not yet proof that events get through.
      opened: function () {
        if (attempt.opened || !handle.alive()) return;
        attempt.opened = true;
        self._status("open", name, null);
        self._settle(null);
      },
      // Proven to work: a later drop reconnects this transport instead of moving on.
      healthy: function () {
        if (attempt.healthy || !handle.alive()) return;
        attempt.healthy = true;
        self._round = 0;
        self._authRetried = false;
        self._worked[name] = true;
        if (attempt.upgrade) self._upgradeWait = self.options.upgradeAfterMs;
        handle.opened();
        self._scheduleUpgrade();
      },
      // ev, and the connection's cursor after it (undefined: the transport sets it later);
      // plain: the cursor is the event's own id (a v1 single-channel answer or frame).
      deliver: function (ev, cursor, plain) {
        if (!handle.alive()) return;
        if (typeof ev.channel !== "string" && single) ev.channel = single; // a v1 answer: this connection's one channel
        self._deliver(ev, name, cursor, plain ? single : null);
      },
      cursor: function (cursor, plain) { if (handle.alive()) self._setCursor(cursor, plain ? single : null); },
      gap: function (info) { if (handle.alive()) self._gap(info, name); },
      // A transport that failed before it ever worked, or stalled, gives way to the next one.
      fail: function (reason, stalled) {
        if (!handle.alive()) return;
        self._gen++;
        if (self._active) self._active.close();
        self._failed(name, reason, attempt, !!stalled);
      },
      // A refusal no other transport can fix (4xx); err carries the HTTP status and error code.
      fatal: function (reason, err) {
        if (!handle.alive()) return;
        self._fatal(reason, err, function () { self._connect(); });
      }
    };
    this._active = OPENERS[name](this, handle);
  };

  GatewayClient.prototype._failed = function (name, reason, attempt, stalled) {
    var delay;
    clearTimeout(this._upgradeTimer);
    // A better transport that let us down again: wait twice as long before the next try.
    if (attempt.upgrade && !attempt.healthy) this._upgradeWait = Math.min(600000, this._upgradeWait * 2);
    if (attempt.healthy && !stalled) {
      // It worked, then dropped (server restart, proxy idle limit): reconnect the same transport.
      if (now() - attempt.started > 30000) this._drops = 0;
      delay = jitter(Math.min(this.options.maxBackoffMs, this.options.backoffMs * Math.pow(2, this._drops)));
      this._drops++;
    } else {
      this._drops = 0;
      this._index++;
      if (this._index >= this.options.transports.length) {
        this._index = 0;
        this._round++;
        delay = jitter(Math.min(this.options.maxBackoffMs, this.options.backoffMs * Math.pow(2, this._round - 1)));
      } else {
        delay = 0;
      }
    }
    this._status("retry", this.options.transports[this._index], name + ": " + reason, delay);
    var self = this;
    clearTimeout(this._timer);
    this._timer = setTimeout(function () { self._connect(); }, delay);
  };

  // After an outage or a network change the client may have settled on a worse transport than one
  // that worked before (say long poll after WebSocket); try that one again now and then. Only
  // transports that worked in this session are retried, so a path that never allowed one costs nothing.
  GatewayClient.prototype._scheduleUpgrade = function () {
    var order = this.options.transports;
    var best = -1;
    for (var i = 0; i < this._index; i++) {
      if (this._worked[order[i]]) { best = i; break; }
    }
    clearTimeout(this._upgradeTimer);
    if (best < 0 || !this.options.upgradeAfterMs) return;
    var self = this;
    var gen = this._gen;
    this._upgradeTimer = setTimeout(function () {
      if (gen !== self._gen || self._closed) return;
      var from = self.transport;
      self._gen++;
      if (self._active) self._active.close();
      self._index = best;
      self._upgrading = true;
      self._status("retry", order[best], from + ": trying " + order[best] + " again, it worked earlier", 0);
      self._connect();
    }, this._upgradeWait);
  };

  // A 4xx ends the client: "unauthorized" (401), "forbidden" (403) or "failed", with the status and
  // the gateway's error code. A token function is asked once more before a 401 is final.
  GatewayClient.prototype._fatal = function (reason, err, retry) {
    var status = err && err.status;
    this._gen++;
    clearTimeout(this._timer);
    clearTimeout(this._upgradeTimer);
    if (this._active) this._active.close();
    this._active = null;
    if (status === 401 && typeof this.options.token === "function" && !this._authRetried && retry) {
      this._authRetried = true;
      this._status("retry", this.transport, reason + " (asking for a fresh token)", 0);
      return retry();
    }
    this._closed = true;
    var state = status === 401 ? "unauthorized" : status === 403 ? "forbidden" : "failed";
    this._settle(new Error("GatewayClient: " + state + ": " + reason));
    this._status(state, this.transport, reason, undefined, { status: status || null, error: (err && err.error) || null });
  };

  // Follow another list of channels: on an open WebSocket by subscribe/unsubscribe frames (each
  // answered by the gateway before the Promise resolves), elsewhere by one reconnect that resumes
  // from the current cursor. Channels new to the cursor start from now.
  GatewayClient.prototype.setChannels = function (channels) {
    var self = this;
    var next = channelList(channels);
    var before = this.channels;
    var P = root.Promise;
    if (this._closed) return P.reject(new Error("GatewayClient: closed"));
    if (next.join(",") === before.join(",")) return P.resolve();
    this.channels = next;
    this.channel = next.join(",");
    if (!next.length) {
      this._gen++;
      clearTimeout(this._timer);
      if (this._active) this._active.close();
      this._active = null;
      this._status("idle", null, "no channels");
      return P.resolve();
    }
    if (!before.length) {
      this._start();
      return this._whenOpen();
    }
    var active = this._active;
    var added = diff(next, before);
    if (active && active.change) {
      return active.change(added, diff(before, next)).then(function (answers) {
        var refused = answers.filter(function (a) { return a; });
        if (refused.length) throw self._drop(refused);
      }, function (e) {
        if (self._active !== active) return self._whenOpen();
        self._reconnect("the WebSocket did not take the change: " + (e && e.message));
        return self._whenOpen();
      });
    }
    if (!added.length) {
      this._reconnect("following " + next.length + " channel(s)");
      return this._whenOpen();
    }
    // A list with one refused channel is refused whole: ask about the new ones first, so a
    // channel this client may not read is turned down alone and the connection goes on.
    return request(this, this.base + "/poll/" + added.map(enc).join(","), this.options.connectTimeoutMs, null).then(
      function () {
        if (self._closed) throw new Error("GatewayClient: closed");
        self._reconnect("following " + self.channels.length + " channel(s)");
        return self._whenOpen();
      },
      function (err) {
        if (!err.fatal) {
          self._reconnect("following " + self.channels.length + " channel(s)");
          return self._whenOpen();
        }
        throw self._drop(added.map(function (c) { return { channel: c, error: err.error, detail: err.message, status: err.status }; }));
      }
    );
  };

  // Channels the gateway refused to add: leave them out and say why (err.status, err.error, err.channels).
  GatewayClient.prototype._drop = function (refused) {
    var names = refused.map(function (r) { return r.channel; });
    this.channels = this.channels.filter(function (c) { return names.indexOf(c) < 0; });
    this.channel = this.channels.join(",");
    var first = refused[0];
    var codes = { unauthorized: 401, forbidden: 403 };
    var err = new Error("GatewayClient: refused " + names.join(", ") + ": " + (first.detail || first.error));
    err.status = first.status || codes[first.error] || 400;
    err.error = first.error || null;
    err.channels = names;
    return err;
  };

  // Resolves when the next connection is open: the gateway has then fixed where each of its
  // channels starts, so an event published after that is not missed.
  GatewayClient.prototype._whenOpen = function () {
    var self = this;
    return new root.Promise(function (resolve, reject) { self._waiters.push({ resolve: resolve, reject: reject }); });
  };

  GatewayClient.prototype._settle = function (err) {
    var list = this._waiters;
    this._waiters = [];
    for (var i = 0; i < list.length; i++) {
      if (err) list[i].reject(err);
      else list[i].resolve();
    }
  };

  GatewayClient.prototype._reconnect = function (reason) {
    if (this._closed) return;
    this._gen++;
    clearTimeout(this._timer);
    if (this._active) this._active.close();
    this._active = null;
    this._status("retry", this.options.transports[this._index], reason, 0);
    this._connect();
  };

  // cursorOf: the channel when the cursor is that one channel's own id (null: a cursor for a list).
  GatewayClient.prototype._setCursor = function (cursor, cursorOf) {
    if (typeof cursor !== "string" || !cursor) return;
    this._cursorOf = cursorOf || null;
    if (cursor === this.lastId) return;
    this.lastId = cursor;
    call(this.options.onCursor, cursor, this._cursorOf);
  };

  GatewayClient.prototype._single = function () {
    return this.channels.length === 1 ? this.channels[0] : null;
  };

  // The gateway resumes a list of channels only from a cursor it gave for a list. Going from one
  // channel (whose cursor is its own id) to several: take the list's cursor from now, then read
  // what the old channel had after our id (events the list's stream repeats are dropped as seen).
  GatewayClient.prototype._rebase = function (gen, then) {
    var self = this;
    var old = this._cursorOf;
    var name = this.transport;
    var timeout = this.options.connectTimeoutMs;
    var alive = function () { return gen === self._gen && !self._closed; };
    var failed = function (err) {
      if (!alive()) return;
      if (err.fatal) return self._fatal(err.message, err, function () { self._connect(); });
      var delay = jitter(Math.min(self.options.maxBackoffMs, self.options.backoffMs * Math.pow(2, self._drops)));
      self._drops++;
      self._status("retry", name, "reading the channels' cursor: " + err.message, delay);
      clearTimeout(self._timer);
      self._timer = setTimeout(function () { self._connect(); }, delay);
    };
    request(this, this.base + "/poll/" + this._path(), timeout, null).then(function (body) {
      if (!alive()) return;
      var done = function () {
        self._setCursor(body.cursor, null);
        then();
      };
      var catchUp = function (from) {
        if (self.channels.indexOf(old) < 0) return done();
        request(self, self.base + "/poll/" + enc(old) + "?since=" + enc(from), timeout, null).then(function (b) {
          if (!alive()) return;
          if (b.gap) self._gap({ requested: from, resumed_from: null, channel: old }, name);
          var events = b.events || [];
          for (var i = 0; i < events.length; i++) {
            events[i].channel = old;
            self._deliver(events[i], name, undefined, null);
          }
          if (b.more && typeof b.cursor === "string" && b.cursor !== from) return catchUp(b.cursor);
          done();
        }, failed);
      };
      if (typeof body.cursor !== "string") return failed({ message: "no cursor in the answer", fatal: false });
      catchUp(self.lastId);
    }, failed);
  };

  GatewayClient.prototype._path = function () {
    return this.channels.map(enc).join(",");
  };

  GatewayClient.prototype._multi = function () {
    return this.channels.length > 1;
  };

  GatewayClient.prototype._deliver = function (ev, name, cursor, cursorOf) {
    var channel = typeof ev.channel === "string" ? ev.channel : this.channels.length === 1 ? this.channels[0] : null;
    if (ev.event === "gap") {
      var info = typeof ev.data === "string" ? parseJSON(ev.data) || {} : ev.data || {};
      this._setCursor(cursor, cursorOf);
      return this._gap({
        requested: info.requested || null,
        resumed_from: info.resumed_from || ev.id || null,
        channel: info.channel || channel
      }, name);
    }
    if (typeof ev.id !== "string" || !ev.id) return;
    var key = (channel || "") + " " + ev.id;
    if (this._seen[key]) return; // already delivered (e.g. by the transport before this one)
    this._seen[key] = true;
    this._seenOrder.push(key);
    if (this._seenOrder.length > SEEN_MAX) delete this._seen[this._seenOrder.shift()];
    this._setCursor(cursor, cursorOf);
    this.stats[name].events++;
    call(this.options.onEvent, { id: ev.id, event: ev.event || "message", data: ev.data, channel: channel }, name);
  };

  GatewayClient.prototype._gap = function (info, name) {
    call(this.options.onGap, info, name);
  };

  GatewayClient.prototype._status = function (state, transport, reason, delayMs, extra) {
    this.state = state;
    var s = { state: state, transport: transport, reason: reason || null };
    if (delayMs !== undefined) s.delayMs = Math.round(delayMs);
    for (var k in extra || {}) s[k] = extra[k];
    call(this.options.onStatus, s);
  };

  GatewayClient.prototype._sinceQuery = function (sep) {
    return this.lastId ? sep + "since=" + enc(this.lastId) : "";
  };

  // EventSource and WebSocket cannot set headers: the token rides in the URL there (the gateway
  // redacts it from its logs); fetch requests send it as a header.
  GatewayClient.prototype._tokenQuery = function (sep) {
    return this._token ? sep + "token=" + enc(this._token) : "";
  };

  GatewayClient.prototype._headers = function (accept) {
    var h = { Accept: accept };
    if (this._token) h.Authorization = "Bearer " + this._token;
    return h;
  };

  // -- transports: each opens, reports through the handle, and returns {close} ----------------
  var OPENERS = {};

  OPENERS.websocket = function (client, h) {
    var opts = client.options;
    if (typeof WebSocket === "undefined") {
      later(function () { h.fail("this browser has no WebSocket"); });
      return { close: noop };
    }
    var query = client._sinceQuery("&") + client._tokenQuery("&");
    var url = client.base.replace(/^http/, "ws") + "/ws/" + client._path() + (query ? "?" + query.slice(1) : "");
    var ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      later(function () { h.fail("WebSocket refused: " + e.message); });
      return { close: noop };
    }
    h.stats.requests++;
    var opened = false;
    var lastFrame = now();
    var checking = false;
    var handshake = setTimeout(function () {
      h.fail("the WebSocket handshake did not finish in " + opts.connectTimeoutMs / 1000 + " s");
    }, opts.connectTimeoutMs);
    var watchdog = null;
    var pending = []; // subscribe/unsubscribe frames sent, waiting for the gateway's answer
    ws.onopen = function () {
      opened = true;
      lastFrame = now();
      clearTimeout(handshake);
      h.opened();
      watchdog = setInterval(check, Math.max(250, opts.stallMs / 4));
    };
    ws.onmessage = function (m) {
      lastFrame = now();
      h.stats.frames++;
      h.stats.bytes += utf8Length(m.data);
      var ev = parseJSON(m.data);
      if (!ev || typeof ev !== "object") return;
      if (answer(ev)) return;
      if (typeof ev.event === "string") {
        h.healthy();
        // v1 frames (one channel, no "channel" key) carry no cursor: the id is one.
        if (typeof ev.cursor === "string") h.deliver(ev, ev.cursor, false);
        else if (typeof ev.channel === "string") h.deliver(ev);
        else h.deliver(ev, ev.id, true);
      }
    };
    ws.onclose = function (e) {
      rejectPending("the WebSocket closed");
      if (opened) {
        // 1008 on a token-authorized socket: the token expired; reconnect here with a fresh one.
        if (e.code === 1008 && client._token) h.healthy();
        return h.fail("the WebSocket closed (code " + e.code + ")");
      }
      // The browser hides the handshake's HTTP status: one poll of the same channels learns
      // whether the gateway refused us (401/403/400: final) or something on the path did.
      request(client, client.base + "/poll/" + client._path(), opts.connectTimeoutMs, null).then(
        function () { h.fail("the WebSocket was refused or cut during the handshake"); },
        function (err) {
          if (err.fatal) h.fatal(err.message, err);
          else h.fail("the WebSocket was refused or cut during the handshake");
        }
      );
    };
    // The gateway answers each subscribe/unsubscribe with a frame naming the action and channel
    // (an error frame naming the channel when refused). True when ev was such an answer.
    function answer(ev) {
      var action = ev.action || (ev.event === "subscribed" ? "subscribe" : ev.event === "unsubscribed" ? "unsubscribe" : null);
      var isError = ev.event === "error" || typeof ev.error === "string";
      if (!action && !(isError && ev.channel)) return false;
      for (var i = 0; i < pending.length; i++) {
        var p = pending[i];
        if (p.channel === ev.channel && (!action || action === p.action)) {
          pending.splice(i, 1);
          clearTimeout(p.timer);
          if (isError || ev.ok === false) p.reject(ev);
          else p.resolve(ev);
          return true;
        }
      }
      return !!action || isError;
    }
    function rejectPending(why) {
      var list = pending;
      pending = [];
      for (var i = 0; i < list.length; i++) { clearTimeout(list[i].timer); list[i].reject(new Error(why)); }
    }
    function send(action, channel) {
      return new root.Promise(function (resolve, reject) {
        var p = { action: action, channel: channel, resolve: resolve, reject: reject };
        p.timer = setTimeout(function () {
          var i = pending.indexOf(p);
          if (i >= 0) pending.splice(i, 1);
          reject(new Error("no answer to " + action + " " + channel + " within " + opts.connectTimeoutMs / 1000 + " s"));
        }, opts.connectTimeoutMs);
        pending.push(p);
        ws.send(JSON.stringify({ action: action, channel: channel }));
      });
    }
    // Browsers show no WebSocket pings to scripts, so silence is checked against the channel itself:
    // if it has moved past our last id and the events still do not come, the socket is stalled.
    function check() {
      if (checking || now() - lastFrame < opts.stallMs) return;
      checking = true;
      var asked = now();
      // Asked from our cursor (not compared with the channel's: a cursor is opaque, and one for
      // several channels may list them in another order).
      var since = client._multi() && client._cursorOf ? "" : client._sinceQuery("?");
      request(client, client.base + "/poll/" + client._path() + since, opts.connectTimeoutMs, h.stats).then(
        function (body) {
          if (!h.alive()) return;
          var moved = !!((body.events && body.events.length) || body.gap);
          if (!moved || client.lastId === null) {
            // Quiet channel: nothing was missed, so the socket counts as working.
            if (client.lastId === null) client._setCursor(body.cursor, client._single());
            checking = false;
            lastFrame = now();
            h.healthy();
            return;
          }
          setTimeout(function () {
            checking = false;
            if (h.alive() && lastFrame < asked) h.fail("the WebSocket is open but events do not arrive", true);
          }, opts.graceMs);
        },
        function () { checking = false; lastFrame = now(); }
      );
    }
    return {
      close: function () {
        clearTimeout(handshake);
        clearInterval(watchdog);
        rejectPending("closed");
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try { ws.close(); } catch (e) { /* already closed */ }
      },
      // Only an open socket changes in place; one still connecting reconnects with the new list.
      change: function (added, removed) {
        if (!opened || ws.readyState !== 1) return root.Promise.reject(new Error("the WebSocket is not open"));
        // Each answer: null, or the gateway's error frame for a channel it refused (the socket
        // stays open for the others). A socket that stops answering rejects.
        var refusal = function (e) { if (e && typeof e.error === "string") return e; throw e; };
        var sent = added.map(function (c) { return send("subscribe", c).then(function () { return null; }, refusal); })
          .concat(removed.map(function (c) { return send("unsubscribe", c).then(function () { return null; }, refusal); }));
        return root.Promise.all(sent);
      }
    };
  };

  OPENERS.sse = function (client, h) {
    var opts = client.options;
    if (!root.fetch || !root.ReadableStream || !root.TextDecoder || !root.AbortController) {
      later(function () { h.fail("this browser cannot stream responses"); });
      return { close: noop };
    }
    var ctrl = new AbortController();
    var url = client.base + "/sse/" + client._path() + client._sinceQuery("?");
    var multi = client._multi();
    var lastByte = now();
    var started = false;
    var parser = new SSEParser(function (ev) {
      // Several channels: data is {"channel", "id" (the channel's own), "data"}; id: is the cursor.
      var env = multi ? parseJSON(ev.data) : null;
      if (env && typeof env === "object" && typeof env.channel === "string") {
        var data = env.data === undefined ? env : typeof env.data === "string" ? env.data : JSON.stringify(env.data);
        return h.deliver({ id: env.id, event: ev.event, data: data, channel: env.channel }, ev.id || undefined, false);
      }
      h.deliver(ev, ev.id || undefined, !multi);
    });
    // The stream counts as working from its first byte; before that, the connect timeout applies.
    var watchdog = setInterval(function () {
      var limit = started ? opts.stallMs : opts.connectTimeoutMs;
      if (now() - lastByte >= limit) {
        h.fail(started ? "the event stream went silent (no events or heartbeats for " + Math.round(limit / 1000) + " s)"
          : "the event stream sent nothing for " + Math.round(limit / 1000) + " s (a buffering proxy?)", true);
      }
    }, Math.max(200, Math.min(opts.stallMs, opts.connectTimeoutMs) / 4));
    h.stats.requests++;
    root.fetch(url, { signal: ctrl.signal, cache: "no-store", headers: client._headers("text/event-stream") }).then(
      function (resp) {
        if (!h.alive()) return;
        if (!resp.ok) return httpError(resp).then(function (err) { err.fatal ? h.fatal(err.message, err) : h.fail(err.message); });
        if ((resp.headers.get("Content-Type") || "").indexOf("text/event-stream") !== 0) {
          return h.fail("the answer is not an event stream (" + resp.headers.get("Content-Type") + ")");
        }
        var reader = resp.body.getReader();
        var decoder = new TextDecoder();
        var pump = function () {
          return reader.read().then(function (chunk) {
            if (!h.alive()) return;
            if (chunk.done) return h.fail("the event stream ended");
            lastByte = now();
            started = true;
            h.stats.bytes += chunk.value.length;
            h.healthy();
            parser.push(decoder.decode(chunk.value, { stream: true }), h.stats);
            return pump();
          });
        };
        return pump();
      }
    ).catch(function (e) { h.fail("the event stream failed: " + (e && e.message)); });
    return { close: function () { clearInterval(watchdog); ctrl.abort(); } };
  };

  OPENERS.long_poll = function (client, h) {
    var path = function () {
      return "/longpoll/" + client._path() + "?timeout=" + client.longPollHoldS + client._sinceQuery("&");
    };
    var timeout = function () { return client.longPollHoldS * 1000 + client.options.connectTimeoutMs; };
    // A request answered with an error after being held a while, but before its hold was up, was cut
    // by something on the path (nginx proxy_read_timeout, a router's idle limit): hold for less.
    var cut = function (err, elapsedMs) {
      var held = elapsedMs / 1000;
      if (err.fatal || held < 2 || held > client.longPollHoldS - 0.5) return false;
      client.longPollHoldS = Math.max(1, Math.floor(held * 0.7));
      h.healthy();
      client._status("open", h.name, "held requests are cut after ~" + Math.round(held) + " s; holding " +
        client.longPollHoldS + " s from now on");
      return true;
    };
    return pollLoop(client, h, path, timeout, 0, cut);
  };

  OPENERS.short_poll = function (client, h) {
    return pollLoop(client, h, function () {
      return "/poll/" + client._path() + client._sinceQuery("?");
    }, function () { return client.options.connectTimeoutMs; }, client.options.pollIntervalMs, null);
  };

  function pollLoop(client, h, path, timeoutMs, intervalMs, onCut) {
    var timer = null;
    var stopped = false;
    function once() {
      if (stopped || !h.alive()) return;
      var asked = client.lastId;
      var sent = now();
      request(client, client.base + path(), timeoutMs(), h.stats).then(
        function (body) {
          if (stopped || !h.alive()) return;
          h.healthy();
          var events = body.events || [];
          var multi = client._multi();
          h.stats.frames++;
          if (body.gap && !events.some(function (e) { return e && e.event === "gap"; })) {
            // Which channels lost history: "gaps" when the gateway names them, else all listed.
            var lost = Array.isArray(body.gaps) ? body.gaps : multi ? [null] : client.channels;
            for (var j = 0; j < lost.length; j++) {
              var ch = lost[j] && typeof lost[j] === "object" ? lost[j].channel : lost[j];
              h.gap({ requested: asked, resumed_from: null, channel: ch });
            }
          }
          // One channel: each id is a cursor. Several: only the response's cursor is.
          for (var i = 0; i < events.length; i++) h.deliver(events[i], multi ? undefined : events[i].id, !multi);
          if (typeof body.cursor === "string") h.cursor(body.cursor, !multi);
          timer = setTimeout(once, body.more ? 0 : intervalMs);
        },
        function (err) {
          if (stopped || !h.alive()) return;
          if (onCut && onCut(err, now() - sent)) timer = setTimeout(once, 0);
          else if (err.fatal) h.fatal(err.message, err);
          else h.fail(err.message);
        }
      );
    }
    once();
    return { close: function () { stopped = true; clearTimeout(timer); } };
  }

  // -- helpers -----------------------------------------------------------------------------------
  // GET JSON with a timeout; rejects with {message, fatal}. 4xx other than 408/429 is fatal:
  // retrying the same request elsewhere cannot fix a bad channel name or a refused origin.
  function request(client, url, timeoutMs, stats) {
    var ctrl = root.AbortController ? new AbortController() : null;
    var timer = setTimeout(function () { if (ctrl) ctrl.abort(); }, timeoutMs);
    if (stats) stats.requests++;
    return root.fetch(url, { signal: ctrl && ctrl.signal, cache: "no-store", headers: client._headers("application/json") })
      .then(function (resp) {
        if (!resp.ok) return httpError(resp).then(function (err) { throw err; });
        return resp.text().then(function (text) {
          if (stats) stats.bytes += utf8Length(text);
          var body = parseJSON(text);
          if (!body || typeof body !== "object") throw { message: "the answer is not the gateway's JSON", fatal: false };
          return body;
        });
      }, function (e) {
        var aborted = e && e.name === "AbortError";
        throw { message: aborted ? "no answer within " + timeoutMs / 1000 + " s" : "network error: " + (e && e.message), fatal: false };
      })
      .then(function (body) { clearTimeout(timer); return body; }, function (err) {
        clearTimeout(timer);
        throw err.message ? err : { message: String(err), fatal: false };
      });
  }

  function httpError(resp) {
    return resp.text().then(function (text) {
      var body = parseJSON(text);
      var detail = body && body.detail ? ": " + body.detail : "";
      var fatal = resp.status >= 400 && resp.status < 500 && resp.status !== 408 && resp.status !== 429;
      var code = body && typeof body.error === "string" ? body.error : null;
      return { message: "HTTP " + resp.status + detail, fatal: fatal, status: resp.status, error: code };
    }, function () { return { message: "HTTP " + resp.status, fatal: false, status: resp.status }; });
  }

  // The text/event-stream format: fields per line, an empty line dispatches, ":" starts a comment.
  function SSEParser(onEvent) {
    this.onEvent = onEvent;
    this.buf = "";
    this.cr = false;
    this.data = [];
    this.event = "";
    this.id = "";
  }

  SSEParser.prototype.push = function (chunk, stats) {
    var text = this.buf + chunk;
    if (this.cr && text.charAt(0) === "\n") text = text.slice(1);
    this.cr = false;
    var re = /\r\n|\r|\n/g;
    var start = 0;
    var m;
    while ((m = re.exec(text))) {
      if (m[0] === "\r" && re.lastIndex === text.length) this.cr = true; // maybe half of a \r\n
      this.line(text.slice(start, m.index), stats);
      start = re.lastIndex;
    }
    this.buf = text.slice(start);
  };

  SSEParser.prototype.line = function (line, stats) {
    if (line === "") {
      if (this.data.length) {
        if (stats) stats.frames++;
        this.onEvent({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
      }
      this.data = [];
      this.event = "";
      return;
    }
    if (line.charAt(0) === ":") return; // comment: heartbeat or padding
    var colon = line.indexOf(":");
    var field = colon < 0 ? line : line.slice(0, colon);
    var value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.charAt(0) === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && value.indexOf("\0") < 0) this.id = value;
  };

  function channelList(channel) {
    var list = Array.isArray(channel) ? channel.slice() : channel ? String(channel).split(",") : [];
    var out = [];
    for (var i = 0; i < list.length; i++) {
      var c = String(list[i]);
      if (c && out.indexOf(c) < 0) out.push(c);
    }
    return out;
  }

  function diff(a, b) { return a.filter(function (x) { return b.indexOf(x) < 0; }); }

  function httpBase(baseUrl) {
    var base = baseUrl || (root.location ? root.location.protocol + "//" + root.location.host : "");
    if (root.location && base.charAt(0) === "/") base = root.location.protocol + "//" + root.location.host + base;
    return base.replace(/\/+$/, "");
  }

  function call(fn) {
    if (typeof fn !== "function") return;
    try {
      fn.apply(null, Array.prototype.slice.call(arguments, 1));
    } catch (e) {
      // A throwing handler must not break the connection or lose the cursor.
      if (root.console) root.console.error("GatewayClient handler failed:", e);
    }
  }

  function parseJSON(text) {
    try { return JSON.parse(text); } catch (e) { return null; }
  }

  function utf8Length(text) {
    if (typeof text !== "string") return text && text.byteLength ? text.byteLength : 0;
    return root.TextEncoder ? new TextEncoder().encode(text).length : text.length;
  }

  function jitter(ms) { return ms * (0.5 + Math.random() * 0.5); }
  function now() { return Date.now(); }
  function enc(s) { return encodeURIComponent(s); }
  function later(fn) { setTimeout(fn, 0); }
  function noop() {}

  GatewayClient.SSEParser = SSEParser;
  GatewayClient.httpError = httpError;
  GatewayClient.httpBase = httpBase;
  root.GatewayClient = GatewayClient;
  if (typeof module === "object" && module.exports) module.exports = GatewayClient;
})(typeof globalThis !== "undefined" ? globalThis : typeof window !== "undefined" ? window : this);
