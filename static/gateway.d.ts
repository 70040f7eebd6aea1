// Type declarations for static/gateway.mjs, the transport gateway's browser client.

export type Transport = "websocket" | "sse" | "long_poll" | "short_poll";

/** connecting → open; retry (with delayMs) between attempts; idle with no channels; the last four are final. */
export type State = "connecting" | "open" | "retry" | "idle" | "unauthorized" | "forbidden" | "failed" | "closed";

export interface GatewayEvent {
  /** The channel's own id of this event: opaque, growing per channel. */
  id: string;
  /** The event name ("message" unless the publisher named it); "gap" when history ran out. */
  event: string;
  /** The event's data as text (JSON published as an object arrives as its JSON text). */
  data: string;
  channel: string;
}

/** Events were lost on `channel` (its history ran out before we resumed): resync its state. */
export interface GapEvent extends GatewayEvent {
  event: "gap";
  id: string | null;
  requested: string | null;
  resumed_from: string | null;
}

export interface StateInfo {
  transport: Transport | null;
  reason: string | null;
  /** "leader" and "follower" when tabs share the connection, else "private". */
  role: "leader" | "follower" | "private" | null;
  /** retry: milliseconds until the next attempt. */
  delayMs?: number;
  /** unauthorized / forbidden / failed: the gateway's HTTP status and JSON error code. */
  status?: number | null;
  error?: string | null;
}

export type TokenSource = string | (() => string | null | Promise<string | null>);

export interface SubscribeOptions {
  /** One handler for every channel (ev.channel names it). */
  onEvent?: (ev: GatewayEvent | GapEvent) => void;
  /** Handlers per channel; their keys are the channels when the second argument is null. */
  channels?: Record<string, (ev: GatewayEvent | GapEvent) => void>;
  onStateChange?: (state: State, info: StateInfo) => void;
  /** Resume from this cursor (a subscription's lastId); implies a connection of its own. */
  since?: string | null;
  /** The order to try transports in (default all four, best first). */
  transports?: Transport[];
  /** For private channels: asked before each connect and when a stream ends at token expiry. */
  token?: TokenSource | null;
  /** Share one connection among the tabs of this origin (default true). */
  shareTabs?: boolean;
  stallMs?: number;
  graceMs?: number;
  connectTimeoutMs?: number;
  longPollTimeoutS?: number;
  pollIntervalMs?: number;
  backoffMs?: number;
  maxBackoffMs?: number;
  upgradeAfterMs?: number;
}

export interface Subscription {
  close(): void;
  /**
   * Follow one more channel (WebSocket: in place; elsewhere: one reconnect from the cursor).
   * Resolves once the connection carries it; rejects with a ChannelRefusedError when the
   * gateway refuses that channel (the connection goes on with the others).
   */
  add(channel: string, onEvent?: (ev: GatewayEvent | GapEvent) => void): Promise<void>;
  remove(channel: string): Promise<void>;
  readonly transport: Transport | null;
  /** The one opaque cursor that resumes every channel of the connection. */
  readonly lastId: string | null;
  readonly channels: string[];
  readonly state: State;
  readonly role: "leader" | "follower" | "private";
}

/** add() refused: `status` 401/403/400, `error` the gateway's code, `channels` those refused. */
export interface ChannelRefusedError extends Error {
  status: number;
  error: string | null;
  channels: string[];
}

export function subscribe(
  baseUrl: string,
  channelOrChannels: string | string[] | null,
  options?: SubscribeOptions,
): Subscription;

export interface PublishOptions {
  token?: TokenSource | null;
  event?: string;
  idempotencyKey?: string;
}

/** Rejected publish: `status` is the HTTP status (0: network), `error` the gateway's code. */
export interface PublishError extends Error {
  status: number;
  error: string | null;
  detail: string | null;
}

export function publish(
  baseUrl: string,
  channel: string,
  data: unknown,
  options?: PublishOptions,
): Promise<{ id: string; channel: string }>;

export const transports: Transport[];
