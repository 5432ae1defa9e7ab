// Types for outpost.js (the SDK is plain JavaScript; these describe its public surface).

export type TransportName = 'websocket' | 'webrtc' | 'sse';

export interface Status {
  state: 'connecting' | 'online' | 'offline' | 'closed';
  online: boolean;
  endpoint: string | null;
  transport: TransportName | null;
  /** Writes not yet acknowledged: queued while offline, or in flight. */
  queued: number;
  /** This connection's id (others address peer-to-peer signals to it). */
  client: string | null;
  replica: string | null;
  /** Whether the endpoint syncs with the fleet: 'disconnected' means an edge without
   * its cloud ("local only": writes are kept and sync when the link returns); 'none'
   * means the endpoint is the cloud; null until known. */
  uplink: 'connected' | 'disconnected' | 'none' | null;
  attempt: number;
  error: string | null;
}

export interface OutpostOptions {
  /** http(s) base URLs, in order of preference (edges, then the cloud). */
  endpoints: string[];
  token: string | (() => string | Promise<string>);
  /** Tried in order on each endpoint. Default ['websocket', 'sse']. */
  transports?: TransportName[];
  /** Reconnect backoff in ms (full jitter; the first retry after a drop is immediate). */
  backoff?: { min: number; max: number };
  connectTimeout?: number;
  /** How often to ping the endpoint, ms (default 5000). */
  pingInterval?: number;
  /** A ping unanswered this long (ms, default 2000) drops the endpoint and fails over:
   * a silently dead endpoint is noticed within pingInterval + pingTimeout. */
  pingTimeout?: number;
  presenceInterval?: number;
  presenceTtl?: number;
  dedupWindow?: number;
  iceServers?: RTCIceServer[];
  /** Open browser-to-browser data channels for broadcasts (default true). */
  peerToPeer?: boolean;
  /** Injected globals (tests, non-browser hosts). */
  env?: Record<string, unknown>;
}

export interface OpMessage {
  type: 'op';
  channel: string;
  dot: string;
  hlc: string;
  token: string;
  op: 'event' | 'set' | 'delete';
  event?: string;
  data?: unknown;
  /** Who published an event: the subject the endpoint authenticated (set by the server). */
  by?: string;
  key?: string;
  value?: unknown;
}

export interface StateEntry {
  value: unknown;
  deleted: boolean;
  conflict?: boolean;
  hlc: [number, number];
  origin: string;
}

export interface StateView {
  type: 'state';
  channel: string;
  key: string;
  value: unknown;
  deleted: boolean;
  conflict: boolean;
  context: string;
  siblings?: { dot: string; hlc: string; value: unknown }[];
}

export interface Member {
  client: string;
  subject?: string;
  data: unknown;
  seen: number;
  via: 'server' | 'heartbeat' | 'self';
  /** This client itself (in `members` of presence events, first, once joined). */
  self?: boolean;
}

type Off = () => void;

export declare function backoffDelay(attempt: number, backoff: { min: number; max: number }, random?: () => number): number;

export declare class DotWindow {
  constructor(size?: number);
  add(dot: string): boolean;
  has(dot: string): boolean;
}

export declare class OutpostError extends Error {
  code: string;
}

export declare class Outpost {
  constructor(opts: OutpostOptions);
  status: Status;
  onStatus(fn: (s: Status) => void): Off;
  on(event: 'status' | 'connect', fn: (s: Status) => void): Off;
  on(event: 'disconnect', fn: (info: { code: number; reason: string }) => void): Off;
  on(event: 'error', fn: (e: OutpostError) => void): Off;
  channel(name: string): Channel;
  /** A namespace subscription (the cloud or a coordinator): every channel `pattern`
   * matches (`*` = one or more characters other than `/`), new ones included. */
  pattern(pattern: string): PatternSubscription;
  queued(): number;
  close(): void;
}

export declare class Channel {
  readonly name: string;
  /** Resume token: everything delivered so far. */
  token: string | null;
  state: Map<string, StateEntry>;
  members: Map<string, Member>;
  subscribe(): Promise<Channel>;
  unsubscribe(): Promise<void>;
  publish(event: string, data?: unknown, opts?: { key?: string }): Promise<string>;
  get(key: string, opts?: { siblings?: boolean }): Promise<StateView>;
  set(key: string, value: unknown, opts?: { context?: string }): Promise<string>;
  delete(key: string, opts?: { context?: string }): Promise<string>;
  loadState(): Promise<Map<string, StateEntry>>;
  broadcast(event: string, data?: unknown): 'p2p' | 'edge';
  join(data: unknown): Promise<void>;
  peerLinks(): string[];
  on(event: 'op', fn: (m: OpMessage) => void): Off;
  on(event: 'state', fn: (e: StateEntry & { key: string }) => void): Off;
  on(event: 'ephemeral', fn: (m: { event: string; data: unknown; from: string; via: 'edge' | 'p2p' }) => void): Off;
  /** The server re-synced the channel from a snapshot: the ops between the old token
   * and `token` will not arrive one by one; the SDK re-reads state (`loadState`). */
  on(event: 'truncated', fn: (m: { token: string }) => void): Off;
  on(event: 'presence', fn: (m: { action: 'join' | 'update' | 'leave'; client: string; data?: unknown; self?: boolean; members: Member[] }) => void): Off;
  /** Everyone present: yourself first once joined (`self: true`), then the others. */
  everyone(): Member[];
  on(event: 'peer', fn: (m: { client: string; open: boolean }) => void): Off;
  on(event: 'subscribed' | 'online', fn: (m: unknown) => void): Off;
}

export declare class PatternSubscription {
  readonly pattern: string;
  /** Your position per channel; pass `Object.fromEntries(tokens)` as `since` to resume. */
  tokens: Map<string, string>;
  matches(channel: string): boolean;
  /** Starts (or resumes from `since`: channel -> token; a channel missing from it is
   * replayed from the start of its retained history). */
  subscribe(opts?: { since?: Record<string, string> }): Promise<PatternSubscription>;
  unsubscribe(): Promise<void>;
  /** A durable op of one of the matching channels (`m.channel`), once per dot. */
  on(event: 'op', fn: (m: OpMessage) => void): Off;
  on(event: 'truncated', fn: (m: { channel: string; token: string }) => void): Off;
  on(event: 'subscribed', fn: (m: { pattern: string; channels: number }) => void): Off;
  on(event: 'error', fn: (e: OutpostError) => void): Off;
}
