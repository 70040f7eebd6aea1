/*
 * gateway.mjs: the transport gateway's browser client as an ES module (no build step).
 *
 *   import { subscribe, publish } from "https://gw.example/static/gateway.mjs";
 *   const sub = subscribe("https://gw.example", ["prices", "news"], {
 *     onEvent(ev) { ... },                  // {id, event, data, channel}; ev.event === "gap" when history ran out
 *     onStateChange(state, info) { ... },   // connecting | open | retry | unauthorized | forbidden | failed | closed
 *     token: () => fetch("/token").then((r) => r.text()),   // or a string; optional
 *   });
 *   await sub.add("alerts"); await sub.remove("news"); sub.close();
 *   const { id } = await publish("https://gw.example", "prices", { p: 1 }, { token });
 *
 * The transports, fallback, upgrade and resume logic are those of gateway-client.js (imported
 * here for its GatewayClient engine, so there is one implementation). This module adds: the
 * per-channel API, tokens on publish, and one connection shared by every tab of an origin: tabs
 * elect a leader with Web Locks, the leader alone connects (for the union of all tabs' channels)
 * and relays events over a BroadcastChannel; when it goes, the next tab in the lock's queue takes
 * over from the last cursor it relayed. Each tab drops what it has already delivered (per channel,
 * by id order), so a takeover neither loses nor repeats an event.
 */
import "./gateway-client.js";

const Engine = globalThis.GatewayClient;
const TIMINGS = [
  "stallMs",
  "graceMs",
  "connectTimeoutMs",
  "longPollTimeoutS",
  "pollIntervalMs",
  "backoffMs",
  "maxBackoffMs",
  "upgradeAfterMs",
];
const SEEN_MAX = 1024;

export const transports = Engine.transports.slice();

/** Follow one channel or several; see gateway.d.ts for the options. */
export function subscribe(baseUrl, channelOrChannels, options = {}) {
  const handlers = isPlainObject(options.channels) ? options.channels : {};
  const initial = channelOrChannels == null ? Object.keys(handlers) : channelOrChannels;
  const sub = new Subscription(baseUrl, toList(initial), options, handlers);
  return sub.api;
}

/** POST /publish/<channel>; resolves to {id, channel}, rejects with an Error carrying status and error. */
export async function publish(baseUrl, channel, data, { token, event, idempotencyKey } = {}) {
  const headers = { "Content-Type": "application/json", Accept: "application/json" };
  const bearer = await resolveToken(token);
  if (bearer) headers.Authorization = "Bearer " + bearer;
  if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
  const body = { data };
  if (event != null) body.event = event;
  const url = Engine.httpBase(baseUrl) + "/publish/" + encodeURIComponent(channel);
  let resp;
  try {
    resp = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), cache: "no-store" });
  } catch (e) {
    throw publishError(`publish to ${channel}: network error: ${e && e.message}`, 0, "network", null);
  }
  const text = await resp.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    json = null;
  }
  if (!resp.ok) {
    const detail = json && json.detail ? json.detail : null;
    const code = json && typeof json.error === "string" ? json.error : null;
    throw publishError(`publish to ${channel}: HTTP ${resp.status}${detail ? ": " + detail : ""}`, resp.status, code, detail);
  }
  if (!json || typeof json.id !== "string") {
    throw publishError(`publish to ${channel}: the answer is not the gateway's JSON`, resp.status, "invalid_answer", null);
  }
  return { id: json.id, channel: json.channel || channel };
}

// -- one subscription: its channels, handlers, and what it has delivered -------------------------
class Subscription {
  constructor(baseUrl, channels, options, handlers) {
    this.base = Engine.httpBase(baseUrl);
    this.channels = channels;
    this.options = options;
    this.handlers = Object.assign({}, handlers);
    this.transport = null;
    this.lastId = options.since || null;
    this.state = "connecting";
    this.closed = false;
    this.last = new Map(); // channel -> the last id delivered (ids grow per channel)
    this.seen = new Map(); // channel -> Set of ids, for ids this module cannot order
    this.gaps = new Set();
    const self = this;
    this.api = {
      close: () => self.close(),
      add: (channel, onEvent) => self.add(channel, onEvent),
      remove: (channel) => self.remove(channel),
      get transport() {
        return self.transport;
      },
      get lastId() {
        return self.lastId;
      },
      get channels() {
        return self.channels.slice();
      },
      get state() {
        return self.state;
      },
      get role() {
        return self.backend.role;
      },
    };
    this.backend = canShare(options) ? new SharedBackend(this) : new PrivateBackend(this);
  }

  engineOptions(extra) {
    const o = { transports: this.options.transports || transports, token: this.options.token || null };
    for (const key of TIMINGS) if (this.options[key] !== undefined) o[key] = this.options[key];
    return Object.assign(o, extra);
  }

  // Hand an event to the app once: only channels this subscription follows, never twice.
  deliver(ev) {
    if (this.closed || !ev || !this.channels.includes(ev.channel)) return;
    if (ev.event === "gap") {
      const key = `${ev.channel} ${ev.requested} ${ev.resumed_from}`;
      if (this.gaps.has(key)) return;
      this.gaps.add(key);
    } else if (!this.fresh(ev.channel, ev.id)) {
      return;
    }
    const fn = this.handlers[ev.channel] || this.options.onEvent;
    if (typeof fn !== "function") return;
    try {
      fn(ev);
    } catch (e) {
      console.error("gateway.mjs: onEvent failed:", e);
    }
  }

  fresh(channel, id) {
    const last = this.last.get(channel);
    const order = last === undefined ? 1 : compareIds(id, last);
    if (order !== null) {
      if (order <= 0) return false;
      this.last.set(channel, id);
      return true;
    }
    let seen = this.seen.get(channel);
    if (!seen) this.seen.set(channel, (seen = new Set()));
    if (seen.has(id)) return false;
    seen.add(id);
    if (seen.size > SEEN_MAX) seen.delete(seen.values().next().value);
    this.last.set(channel, id);
    return true;
  }

  status(state, info) {
    if (this.closed && state !== "closed") return;
    this.state = state;
    if (info && "transport" in info) this.transport = info.transport;
    const fn = this.options.onStateChange;
    if (typeof fn !== "function") return;
    try {
      fn(state, Object.assign({ role: this.backend ? this.backend.role : null }, info));
    } catch (e) {
      console.error("gateway.mjs: onStateChange failed:", e);
    }
  }

  add(channel, onEvent) {
    if (typeof onEvent === "function") this.handlers[channel] = onEvent;
    if (this.channels.includes(channel)) return Promise.resolve();
    this.channels = this.channels.concat([channel]);
    return this.backend.changed().catch((e) => {
      // Refused (e.status 401/403/400): the connection goes on without it.
      if (e && Array.isArray(e.channels) && e.channels.includes(channel)) {
        this.channels = this.channels.filter((c) => c !== channel);
        this.backend.refusedLocally?.(channel);
      }
      throw e;
    });
  }

  remove(channel) {
    if (!this.channels.includes(channel)) return Promise.resolve();
    this.channels = this.channels.filter((c) => c !== channel);
    this.last.delete(channel);
    this.seen.delete(channel);
    return this.backend.changed();
  }

  close() {
    if (this.closed) return;
    this.backend.close();
    this.status("closed", { transport: this.transport, reason: "closed by the application" });
    this.closed = true;
  }
}

// -- a connection of this tab's own ----------------------------------------------------------------
class PrivateBackend {
  constructor(sub) {
    this.sub = sub;
    this.role = "private";
    this.engine = new Engine(sub.base, sub.channels, sub.engineOptions(engineCallbacks(sub, { since: sub.lastId })));
  }

  changed() {
    return this.engine.setChannels(this.sub.channels);
  }

  close() {
    this.engine.options.onStatus = null;
    this.engine.close();
  }
}

// The engine's callbacks for a subscription; `relay` (the tab leader's) sees everything too.
function engineCallbacks(sub, extra, relay = {}) {
  return Object.assign(
    {
      onEvent(ev) {
        if (relay.event) relay.event(ev);
        sub.deliver(ev);
      },
      onGap(info) {
        const ev = gapEvent(info);
        if (relay.event) relay.event(ev);
        sub.deliver(ev);
      },
      onStatus(s) {
        const info = statusInfo(s);
        if (relay.status) relay.status(s.state, info);
        sub.status(s.state, info);
      },
      onCursor(cursor, cursorOf) {
        sub.lastId = cursor;
        if (relay.cursor) relay.cursor(cursor, cursorOf);
      },
    },
    extra,
  );
}

// -- one connection for every tab of this origin --------------------------------------------------
// Messages on the BroadcastChannel (each {t, from, ...}):
//   join / channels {channels}: a subscription's channels (everyone keeps the table; the leader acts)
//   bye: a subscription ended        leader: a new leader asks everyone to say their channels again
//   event {ev, cursor}: relayed by the leader, cursor being where the connection stood after it
//   cursor {cursor}: the connection moved on without an event   state {state, info}: the leader's state
class SharedBackend {
  constructor(sub) {
    this.sub = sub;
    this.role = "follower";
    this.id = Math.random().toString(36).slice(2) + Date.now().toString(36);
    this.name = `gateway.mjs ${sub.base} ${(sub.options.transports || transports).join(",")}`;
    this.members = new Map(); // subscription id -> its channels
    this.leaderId = null;
    this.cursor = null; // the last cursor the leader relayed: where a new leader resumes
    this.cursorOf = null; // the channel whose own id that cursor is (from a one-channel connection)
    this.engine = null;
    this.posted = null;
    this.unionTimer = null;
    this.waiting = new Map(); // ref -> the Promise of a change the leader has not confirmed yet
    this.refs = 0;
    this.refused = new Set(); // channels the gateway turned down for the leader: kept off the union
    this.bc = new BroadcastChannel(this.name);
    this.bc.onmessage = (e) => this.receive(e.data);
    this.post({ t: "join", channels: sub.channels });
    this.lockAbort = new AbortController();
    navigator.locks
      .request(this.name, { signal: this.lockAbort.signal }, () => {
        if (this.sub.closed) return undefined;
        return new Promise((release) => {
          this.release = release;
          this.lead();
        });
      })
      .catch(() => {}); // aborted: closed while waiting for the lock
    this.onHide = () => this.sub.close();
    addEventListener("pagehide", this.onHide);
  }

  post(message) {
    message.from = this.id;
    try {
      this.bc.postMessage(message);
    } catch (e) {
      console.error("gateway.mjs: could not relay", e);
    }
  }

  receive(m) {
    if (!m || typeof m !== "object" || this.sub.closed) return;
    switch (m.t) {
      case "join":
      case "channels":
        this.members.set(m.from, toList(m.channels));
        if (!this.engine) break;
        if (m.t === "join") this.post({ t: "state", state: this.sub.state, info: this.info() });
        if (m.ref) {
          // A follower's add()/remove(): answer once the connection carries the new union.
          clearTimeout(this.unionTimer);
          const mine = toList(m.channels);
          const done = (e) => {
            if (e && Array.isArray(e.channels)) for (const c of e.channels) this.refused.add(c);
            // Another tab's refused channel is not this one's failure.
            if (e && Array.isArray(e.channels) && !e.channels.some((c) => mine.includes(c))) e = null;
            const error = e ? { message: String(e.message || e), status: e.status, error: e.error, channels: e.channels } : null;
            this.post({ t: "changed", ref: m.ref, error });
          };
          this.engine.setChannels(this.union()).then(() => done(null), done);
        } else {
          this.unionChanged();
        }
        break;
      case "changed": {
        const waiter = this.waiting.get(m.ref);
        if (waiter) {
          this.waiting.delete(m.ref);
          clearTimeout(waiter.timer);
          if (m.error) waiter.reject(Object.assign(new Error(m.error.message), m.error));
          else waiter.resolve();
        }
        break;
      }
      case "bye":
        this.members.delete(m.from);
        if (this.engine) this.unionChanged();
        break;
      case "leader":
        this.leaderId = m.from;
        this.post({ t: "channels", channels: this.sub.channels });
        break;
      case "event":
        this.leaderId = m.from;
        if (m.cursor) this.setCursor(m.cursor, m.cursorOf);
        this.sub.deliver(m.ev);
        break;
      case "cursor":
        this.setCursor(m.cursor, m.cursorOf);
        break;
      case "state":
        this.leaderId = m.from;
        if (!this.engine) this.sub.status(m.state, m.info);
        break;
    }
  }

  // A channel this subscription gave up (refused): tell the others, so the union forgets it.
  refusedLocally() {
    this.post({ t: "channels", channels: this.sub.channels });
  }

  setCursor(cursor, cursorOf) {
    if (typeof cursor !== "string" || !cursor) return;
    this.cursor = cursor;
    this.cursorOf = typeof cursorOf === "string" ? cursorOf : null;
    this.sub.lastId = cursor;
  }

  info() {
    return { transport: this.sub.transport, reason: null, cursor: this.cursor };
  }

  union() {
    const all = new Set(this.sub.channels);
    for (const list of this.members.values()) for (const c of list) all.add(c);
    for (const c of this.refused) all.delete(c);
    return [...all].sort();
  }

  // This tab holds the lock: connect for everyone, from the last cursor the old leader relayed.
  lead() {
    this.role = "leader";
    if (this.leaderId) this.members.delete(this.leaderId); // the tab we take over from is gone
    this.leaderId = this.id;
    this.post({ t: "leader" });
    const since = this.cursor;
    const relay = {
      event: (ev) => {
        this.posted = this.engine ? this.engine.lastId : this.cursor;
        this.cursor = this.posted || this.cursor;
        this.post({ t: "event", ev, cursor: this.posted, cursorOf: this.cursorOf });
      },
      // A cursor that moved without an event (a poll's end, the first read): tell after any
      // event it belongs to has gone out, so the followers' cursor never runs ahead of their events.
      cursor: (cursor, cursorOf) => {
        this.cursor = cursor;
        this.cursorOf = cursorOf || null;
        queueMicrotask(() => {
          if (this.engine && this.posted !== cursor && this.cursor === cursor) {
            this.posted = cursor;
            this.post({ t: "cursor", cursor, cursorOf: this.cursorOf });
          }
        });
      },
      status: (state, info) => {
        if (!this.handingOver) this.post({ t: "state", state, info: Object.assign({}, info, { cursor: this.cursor }) });
      },
    };
    this.engine = new Engine(
      this.sub.base,
      this.union(),
      this.sub.engineOptions(engineCallbacks(this.sub, { since, sinceOf: since ? this.cursorOf : null }, relay)),
    );
  }

  unionChanged() {
    clearTimeout(this.unionTimer);
    // Tabs open together: one reconnect for the lot, not one per tab.
    this.unionTimer = setTimeout(() => {
      if (!this.engine) return;
      this.engine.setChannels(this.union()).catch((e) => {
        // Refused for the leader's token: keep it off the union (or closed meanwhile).
        if (e && Array.isArray(e.channels)) for (const c of e.channels) this.refused.add(c);
      });
    }, 50);
  }

  changed() {
    if (this.engine) {
      this.post({ t: "channels", channels: this.sub.channels });
      clearTimeout(this.unionTimer);
      return this.engine.setChannels(this.union()).catch((e) => {
        if (e && Array.isArray(e.channels)) for (const c of e.channels) this.refused.add(c);
        throw e;
      });
    }
    // A follower: the leader says when its connection carries the change. With no leader
    // answering (one is taking over), settle after the connect timeout: the next leader connects
    // for every tab's channels anyway.
    const ref = this.id + ":" + ++this.refs;
    this.post({ t: "channels", channels: this.sub.channels, ref });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(ref);
        resolve();
      }, this.sub.options.connectTimeoutMs || 10000);
      this.waiting.set(ref, { resolve, reject, timer });
    });
  }

  close() {
    removeEventListener("pagehide", this.onHide);
    clearTimeout(this.unionTimer);
    if (this.engine) {
      this.handingOver = true;
      this.engine.close();
      if (this.engine.lastId) this.post({ t: "cursor", cursor: this.engine.lastId, cursorOf: this.cursorOf });
      this.engine = null;
    }
    for (const waiter of this.waiting.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new Error("gateway.mjs: the subscription was closed"));
    }
    this.waiting.clear();
    this.post({ t: "bye" });
    this.lockAbort.abort();
    if (this.release) this.release(); // the next tab in the lock's queue takes over
    this.bc.close();
  }
}

// -- helpers ---------------------------------------------------------------------------------------
function canShare(options) {
  if (options.shareTabs === false || options.since) return false; // a cursor of its own: its own connection
  return (
    typeof BroadcastChannel === "function" &&
    typeof navigator !== "undefined" &&
    !!navigator.locks &&
    typeof navigator.locks.request === "function"
  );
}

function gapEvent(info) {
  return {
    event: "gap",
    channel: info.channel,
    id: info.resumed_from || null,
    requested: info.requested || null,
    resumed_from: info.resumed_from || null,
    data: JSON.stringify({ requested: info.requested || null, resumed_from: info.resumed_from || null }),
  };
}

function statusInfo(s) {
  const info = { transport: s.transport || null, reason: s.reason || null };
  if (s.delayMs !== undefined) info.delayMs = s.delayMs;
  if (s.status !== undefined) info.status = s.status;
  if (s.error !== undefined) info.error = s.error;
  return info;
}

// Ids of this gateway are "<ms>-<seq>": compare them as two numbers; null when either is not one.
function compareIds(a, b) {
  const x = /^(\d+)-(\d+)$/.exec(a);
  const y = /^(\d+)-(\d+)$/.exec(b);
  if (!x || !y) return null;
  return compareDigits(x[1], y[1]) || compareDigits(x[2], y[2]);
}

function compareDigits(a, b) {
  a = a.replace(/^0+(?=\d)/, "");
  b = b.replace(/^0+(?=\d)/, "");
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

async function resolveToken(token) {
  const value = typeof token === "function" ? await token() : await token;
  return value ? String(value) : null;
}

function publishError(message, status, code, detail) {
  const err = new Error(message);
  err.status = status;
  err.error = code;
  err.detail = detail;
  return err;
}

function toList(channels) {
  const list = Array.isArray(channels) ? channels : channels ? String(channels).split(",") : [];
  return [...new Set(list.map(String).filter(Boolean))];
}

function isPlainObject(x) {
  return !!x && typeof x === "object" && !Array.isArray(x);
}
