// roomcast.js — a small, dependency-free browser client for the roomcast
// WebSocket rooms server (wire contract v1: shared/PROTOCOL.md, client guide:
// docs/protocol.md). One ES module, no build step:
//
//   import { RoomcastClient } from "/roomcast.js";
//   const client = new RoomcastClient({ token });          // or { getToken: async ({ fresh }) => jwt }
//   client.addEventListener("message", (e) => render(e.detail));
//   await client.join("lobby");
//   await client.send("lobby", { text: "hello" });          // resolves with the ack: { seq }
//
// What it does for you:
// - connects to ws(s)://HOST/ws?token=… and reconnects by itself with exponential
//   backoff and full jitter (a random delay in [0, min(cap, base·2^attempt)]);
// - remembers each room's epoch and last seq, re-joins every room with `since` and
//   `epoch` after a reconnect, and emits a `notice` per room: `recovered` or `gap`;
// - delivers each room message exactly once and in seq order (duplicates from
//   replays are dropped; a seq jump or a `lagged` report triggers a re-join with
//   `since`, and the replay fills the hole);
// - honours close codes: 4003 → stay closed; 4001 → getToken({ fresh: true }) then
//   reconnect; 1001 → reconnect after the `retry_ms=N` hint; 4000 and the rest →
//   backoff and recover;
// - tells a refused token from a network failure: a browser cannot read the status
//   of a refused upgrade, so after a connection that closed before opening it asks
//   GET /token/check (PROTOCOL §1) once. A 401 stops the retries with the same token
//   and emits `auth_error`; with getToken, one getToken({ fresh: true, reason:
//   "auth_error" }) first, and only the same token again (or a failure) stops it.
//   A 200, or no usable answer, keeps the normal backoff;
// - request ids with promises, an outbox for messages sent while disconnected,
//   app-level pings to notice a dead link, token refresh before `exp`, and the
//   typing protocol (true on input, false on send or when idle).
//
// Events (an EventTarget; each event is a CustomEvent whose `detail` is listed):
//   state        { state, previous }  state: "idle" | "connecting" | "open" | "reconnecting" | "closed"
//   retry        { delayMs, attempt, code }           a reconnect is scheduled
//   welcome      welcome payload { connection_id, user, heartbeat_ms, server_time }
//   joined       joined payload  { room, count, seq, epoch, recovered?, missed? }
//   left         { room }
//   message      message payload { room, user, content, seq, ts } plus `replayed: bool`
//   direct       direct payload  { from, content, ts }
//   typing       { room, user, is_typing }
//   user_joined  { room, user, count }
//   user_left    { room, user, count }
//   presence     { room, users: [{ id, name, connections }] }
//   notice       { kind, room?, … }  kinds: "recovered" { room, missed } |
//                "gap" { room, reason: "jump"|"history"|"epoch"|"reset", from?, to?, missed? } |
//                "lagged" { room, from, to } | "shutdown" { retryMs } |
//                "token_expired" | "disconnected" { code, reason }
//   auth_error   { code, message }  the server refused the token (GET /token/check said 401);
//                code: "missing" | "malformed" | "bad_signature" | "expired" | "not_yet_valid" |
//                "invalid_claims"; message: a sentence such as "the token has expired". Without
//                getToken (or when it cannot give another token) state "closed" follows
//   error        { code, message, id?, request? }     server `error` frames and client-side failures
//   close        { code, reason, wasClean }           the socket closed (before any reconnect)
//
// You can also use `client.on(type, fn)` which passes `detail` and returns an
// unsubscribe function.
//
// Outside a browser there is no page location, so pass `url`. Node 22+ has global
// WebSocket and fetch, and nothing else is needed:
//
//   const client = new RoomcastClient({ url: "http://127.0.0.1:8080", token });
//
// Node 20 has fetch but its WebSocket is behind `node --experimental-websocket`
// (20.10+); without the flag pass a constructor, e.g. from the `ws` package:
//
//   import { WebSocket } from "ws";
//   const client = new RoomcastClient({ url: "http://127.0.0.1:8080", token, WebSocket });
//
// `options.fetch` replaces the fetch used for GET /token/check the same way.

const DEFAULTS = {
  url: undefined, // base URL: "wss://chat.example.com", "https://…" or "/"; default: this page's host
  path: "/ws",
  baseDelayMs: 500, // backoff base
  maxDelayMs: 30000, // backoff cap
  connectTimeoutMs: 15000, // from `new WebSocket` to `welcome`
  checkTimeoutMs: 5000, // GET /token/check after a refused connection; slower counts as no answer
  requestTimeoutMs: 15000, // a request without a reply by then is rejected with "timeout"
  outboxTimeoutMs: 60000, // a queued (offline) request not sent by then is rejected
  typingIdleMs: 3000, // send typing:false after this long without input
  // While input continues, repeat typing:true at most this often. Keep it under the
  // server's --typing-timeout-ms (default 6000), which expires a silent typist.
  typingRefreshMs: 1000,
  rateLimitRetries: 3, // resend a rate-limited message/direct this many times
  rateLimitDelayMs: 1000,
  history: false, // default for join(): on the first join, replay the room's backlog (since: 0)
  autoConnect: true,
};

/** States of the connection, in the order they usually appear. */
export const States = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/** Close codes of the roomcast contract (§8). */
export const CloseCodes = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // server shutdown; reason carries retry_ms=N
  PROTOCOL_ERROR: 1002,
  UNSUPPORTED_DATA: 1003,
  ABNORMAL: 1006,
  INVALID_PAYLOAD: 1007,
  POLICY: 1008, // flooding
  TOO_BIG: 1009,
  INTERNAL: 1011, // heartbeat timeout
  SLOW_CONSUMER: 4000,
  TOKEN_EXPIRED: 4001,
  DISCONNECTED: 4003, // by the server API: do not reconnect
});

/** An error from the server (`code` is the contract's error code) or from the client. */
export class RoomcastError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "RoomcastError";
    this.code = code;
    Object.assign(this, extra);
  }
}

// Requests whose failure means the join will never succeed as asked.
const FATAL_JOIN_ERRORS = new Set(["forbidden", "invalid_room", "too_many_rooms", "invalid_message"]);
// Requests that may wait in the outbox while the connection is down.
const QUEUEABLE = new Set(["message", "direct"]);
// `auth_error` messages for GET /token/check's codes (PROTOCOL §1).
const AUTH_ERROR_MESSAGES = {
  missing: "no token was given",
  malformed: "the token is not a well-formed JWT",
  bad_signature: "the token was not signed with this server's secret",
  expired: "the token has expired",
  not_yet_valid: "the token is not valid yet",
  invalid_claims: "the token's claims are not valid",
};

export class RoomcastClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} [options.token]    a JWT
   * @param {(info: {fresh: boolean, reason: string}) => Promise<string>|string} [options.getToken]
   *        called for the first token (when `token` is not given), for a fresh one after
   *        close 4001 (reason "token_expired") or a refused token (reason "auth_error"),
   *        and before the current one's `exp` (reason "refresh").
   * @param {string} [options.url]      base URL of the server (ws:, wss:, http:, https: or a path)
   * @param {typeof WebSocket} [options.WebSocket]  a WebSocket constructor (default: globalThis.WebSocket)
   * @param {typeof fetch} [options.fetch]  for GET /token/check (default: globalThis.fetch; without
   *        one a refused connection is retried with backoff like a network failure)
   * See DEFAULTS above for the other options.
   */
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this.url = wsBase(this.options.url);
    this._token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    if (!this._token && !this._getToken) throw new TypeError("roomcast: pass `token` or `getToken`");
    this._WS = options.WebSocket ?? globalThis.WebSocket;
    if (!this._WS) throw new TypeError("roomcast: no WebSocket implementation: pass options.WebSocket");
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);

    this.state = States.IDLE;
    this.user = null; // { id, name } from welcome
    this.connectionId = null;
    this.heartbeatMs = 0;
    this.serverTimeOffsetMs = 0; // server clock minus ours, from welcome
    this.nextRetryAt = null; // ms timestamp of the next scheduled reconnect

    this._rooms = new Map(); // name -> RoomState
    this._pending = new Map(); // request id -> { resolve, reject, timer, type, payload, tries }
    this._outbox = []; // requests waiting for the connection: { type, payload, resolve, reject, timer, tries }
    this._typing = new Map(); // room -> { active, lastSent, idle }
    this._nextId = 1;
    this._attempt = 0;
    this._gen = 0; // bumps on every connect attempt, so stale async steps give up
    this._ws = null;
    this._ready = false; // welcome received on the current socket
    this._stopped = true;
    this._freshToken = false;
    this._authRenewals = 0; // tokens from getToken after an auth_error, since the last welcome
    this._lastHeard = 0;
    this._timers = { retry: null, connect: null, heartbeat: null, refresh: null };
    this._onOnline = () => {
      if (this.state === States.RECONNECTING && !this._ws) this._open("online");
    };

    // On the next microtask, so listeners added right after `new` see "connecting".
    if (this.options.autoConnect) queueMicrotask(() => this._stopped && this.state === States.IDLE && this.connect());
  }

  // ---- public API -------------------------------------------------------------

  /** Start (or restart after close()) connecting. Idempotent. */
  connect() {
    if (!this._stopped) return;
    this._stopped = false;
    globalThis.addEventListener?.("online", this._onOnline);
    this._open("connect");
  }

  /** Close for good (until connect() is called again). Rejects everything pending. */
  close(code = 1000, reason = "client closed") {
    this._stopped = true;
    globalThis.removeEventListener?.("online", this._onOnline);
    this._clearTimer("retry");
    this.nextRetryAt = null;
    const ws = this._ws;
    if (ws) {
      detach(ws);
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
      this._teardown(new RoomcastError("closed", "client closed"));
    }
    this._failOutbox(new RoomcastError("closed", "client closed"));
    this._setState(States.CLOSED);
  }

  /** Force a reconnect now (for example from a "retry now" button). */
  reconnect() {
    if (this._stopped) return this.connect();
    const ws = this._ws;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, "reconnect");
      } catch {
        /* ignore */
      }
      this._teardown(new RoomcastError("disconnected", "reconnecting"));
    }
    this._attempt = 0;
    this._open("reconnect");
  }

  /**
   * Join a room. Resolves with the `joined` payload once the server confirms (waiting
   * for the connection if needed); rejects on `forbidden`, `invalid_room`, …
   * The room stays joined across reconnects until leave().
   * @param {string} room
   * @param {{history?: boolean}} [opts] history: on this first join, replay the room's backlog
   */
  join(room, opts = {}) {
    let r = this._rooms.get(room);
    if (!r) {
      r = {
        name: room,
        epoch: null,
        lastSeq: 0,
        joined: false,
        joinId: null,
        sentSince: undefined,
        replayLeft: 0,
        count: 0,
        history: opts.history ?? this.options.history,
        waiters: [],
        retryTimer: null,
      };
      this._rooms.set(room, r);
    } else if (r.joined && r.joinId === null) {
      return Promise.resolve(this._joinedInfo(r));
    }
    const promise = new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
    if (this._ready && r.joinId === null) this._sendJoin(r);
    return promise;
  }

  /** Leave a room. Resolves with `{ room }`. */
  leave(room) {
    const r = this._rooms.get(room);
    this.stopTyping(room);
    if (r) {
      this._rooms.delete(room);
      clearTimeout(r.retryTimer);
      for (const w of r.waiters.splice(0)) w.reject(new RoomcastError("left", `left ${room}`));
    }
    if (!this._ready) return Promise.resolve({ room });
    return this.request("leave", { room });
  }

  /** Publish to a room. Resolves with the ack `{ seq }`. Queued while disconnected. */
  send(room, content) {
    this.stopTyping(room);
    return this.request("message", { room, content });
  }

  /** Alias of send(). */
  sendMessage(room, content) {
    return this.send(room, content);
  }

  /** Send to every connection of a user. Resolves with the ack `{}`; rejects with `user_offline`. */
  direct(to, content) {
    return this.request("direct", { to, content });
  }

  /**
   * Tell a room whether you are typing. Resolves true when sent (typing frames get no
   * reply). Prefer typingInput()/stopTyping(), which do the bookkeeping.
   */
  typing(room, isTyping) {
    const t = this._typingState(room);
    clearTimeout(t.idle);
    const sent = this._sendTyping(room, Boolean(isTyping));
    t.active = sent && Boolean(isTyping);
    t.lastSent = Date.now();
    return Promise.resolve(sent);
  }

  /** Call on every input event of a room's composer: sends typing:true (repeated while
   * typing continues) and typing:false after `typingIdleMs` without input. */
  typingInput(room) {
    const t = this._typingState(room);
    const now = Date.now();
    if (!t.active || now - t.lastSent >= this.options.typingRefreshMs) {
      if (this._sendTyping(room, true)) {
        t.active = true;
        t.lastSent = now;
      }
    }
    clearTimeout(t.idle);
    t.idle = setTimeout(() => this.stopTyping(room), this.options.typingIdleMs);
  }

  /** Send typing:false if typing:true was the last thing sent for the room. */
  stopTyping(room) {
    const t = this._typing.get(room);
    if (!t) return;
    clearTimeout(t.idle);
    if (t.active) {
      t.active = false;
      this._sendTyping(room, false);
    }
  }

  /** Ask who is in a room. Resolves with `{ room, users: [{ id, name, connections }] }`. */
  presence(room) {
    return this.request("presence", { room });
  }

  /** Round trip to the server. Resolves with `{ server_time, rtt_ms }`. */
  async ping() {
    const started = Date.now();
    const pong = await this.request("ping", {});
    return { ...pong, rtt_ms: Date.now() - started };
  }

  /** Replace the connection's token (same `sub`). Resolves with `{ exp }`. */
  refresh(token) {
    return this.request("refresh", { token }).then((reply) => {
      this._token = token;
      this._scheduleRefresh();
      return reply;
    });
  }

  /**
   * Send any request with an id; resolves with the reply payload, rejects with a
   * RoomcastError (server error code, "timeout", "disconnected", "not_connected").
   * `message` and `direct` wait in an outbox while the connection is down.
   */
  request(type, payload = {}, { queue = QUEUEABLE.has(type) } = {}) {
    return new Promise((resolve, reject) => {
      const req = { type, payload, resolve, reject, tries: 0, timer: null };
      if (this._ready) return this._dispatchRequest(req);
      if (queue && !this._stopped) {
        req.timer = setTimeout(() => {
          const i = this._outbox.indexOf(req);
          if (i >= 0) this._outbox.splice(i, 1);
          reject(new RoomcastError("timeout", `${type} not sent: still disconnected`));
        }, this.options.outboxTimeoutMs);
        this._outbox.push(req);
        return;
      }
      reject(new RoomcastError("not_connected", `${type}: not connected`));
    });
  }

  /** Rooms this client wants to be in (joined or being (re)joined). */
  rooms() {
    return [...this._rooms.keys()];
  }

  /** What the client knows about a room: `{ room, epoch, lastSeq, joined, count }` or null. */
  roomState(room) {
    const r = this._rooms.get(room);
    return r ? this._joinedInfo(r) : null;
  }

  /** Subscribe with a plain callback receiving `detail`. Returns an unsubscribe function. */
  on(type, fn) {
    const listener = (event) => fn(event.detail, event);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  // ---- connection lifecycle -----------------------------------------------------

  async _open(reason) {
    this._clearTimer("retry");
    this.nextRetryAt = null;
    if (this._stopped) return;
    const gen = ++this._gen;
    const s = this.state;
    this._setState(s === States.IDLE || s === States.CLOSED ? States.CONNECTING : States.RECONNECTING);

    let token = this._token;
    if (this._getToken && (this._freshToken || !token)) {
      try {
        token = await this._getToken({ fresh: this._freshToken, reason });
      } catch (err) {
        if (gen !== this._gen || this._stopped) return;
        this._emit("error", { code: "token_unavailable", message: `getToken failed: ${err?.message ?? err}` });
        return this._scheduleRetry({ code: null });
      }
      if (gen !== this._gen || this._stopped) return;
      if (!token) {
        this._emit("error", { code: "token_unavailable", message: "getToken returned no token" });
        return this._scheduleRetry({ code: null });
      }
      this._token = token;
      this._freshToken = false;
    }

    let ws;
    try {
      ws = new this._WS(`${this.url}${this.options.path}?token=${encodeURIComponent(token)}`);
    } catch (err) {
      this._emit("error", { code: "connect_failed", message: String(err?.message ?? err) });
      return this._scheduleRetry({ code: null });
    }
    this._ws = ws;
    ws._rcOpened = false;
    ws._rcToken = token;
    ws.onopen = () => {
      ws._rcOpened = true;
      this._lastHeard = Date.now();
    };
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onerror = () => {
      // Browsers follow with a close event in the same task; Node 20's WebSocket fires
      // none after a refused upgrade, so make sure one comes (_onClose ignores a socket
      // it already closed).
      if (!ws._rcOpened) setTimeout(() => this._onClose(ws, CloseCodes.ABNORMAL, "", false), 0);
    };
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason, ev.wasClean);
    this._timers.connect = setTimeout(() => {
      if (this._ws === ws && !this._ready) this._abandon(ws, "connect timeout");
    }, this.options.connectTimeoutMs);
  }

  /** Give up on a socket that looks dead, without waiting for a close handshake. */
  _abandon(ws, why) {
    detach(ws);
    try {
      ws.close(1000, why);
    } catch {
      /* ignore */
    }
    this._onClose(ws, CloseCodes.ABNORMAL, why, false);
  }

  _onClose(ws, code, reason, wasClean) {
    if (ws !== this._ws) return;
    detach(ws);
    const opened = ws._rcOpened;
    this._teardown(new RoomcastError("disconnected", `connection closed (${code})`, { closeCode: code }));
    this._emit("close", { code, reason, wasClean });
    if (this._stopped) return this._setState(States.CLOSED);

    if (code === CloseCodes.DISCONNECTED) {
      this._stopped = true;
      this._failOutbox(new RoomcastError("disconnected", "disconnected by the server"));
      this._emit("notice", { kind: "disconnected", code, reason });
      return this._setState(States.CLOSED);
    }
    if (code === CloseCodes.TOKEN_EXPIRED) {
      this._emit("notice", { kind: "token_expired", code, reason });
      if (!this._getToken) {
        this._stopped = true;
        this._failOutbox(new RoomcastError("token_expired", "token expired and no getToken to renew it"));
        this._emit("error", { code: "token_expired", message: "token expired; pass getToken to renew it" });
        return this._setState(States.CLOSED);
      }
      this._freshToken = true;
      this._setState(States.RECONNECTING);
      return this._open("token_expired");
    }
    if (code === CloseCodes.GOING_AWAY) {
      const hint = /retry_ms=(\d+)/.exec(reason || "");
      if (hint) {
        const retryMs = Number(hint[1]);
        this._emit("notice", { kind: "shutdown", retryMs, reason });
        return this._scheduleRetry({ code, delayMs: retryMs });
      }
    }
    if ([1002, 1003, 1007, 1009].includes(code)) {
      this._emit("error", { code: "client_bug", message: `closed with ${code}: ${reason || "protocol violation"}` });
    }
    // A socket that never opened may have been refused at the handshake (a 401 for an
    // expired token looks the same as a refused TCP connection from here): ask why.
    if (!opened) return this._diagnose(ws._rcToken, code);
    return this._scheduleRetry({ code, extra: code === CloseCodes.POLICY ? 5 : 0 });
  }

  /** After a connection that closed before opening: was it the token? One check per
   * failed attempt, and only then, so a healthy client never pays for it. */
  async _diagnose(token, code) {
    const gen = this._gen;
    const verdict = await this._checkToken(token);
    if (gen !== this._gen || this._stopped) return; // reconnect(), close() or "online" meanwhile
    if (verdict?.error) return this._onAuthError(token, verdict.error);
    // No answer (server down, an older server without the endpoint, no fetch): as before
    // the check existed, a getToken app gets a fresh token in case this one was the
    // trouble. A 200 means the token is fine (503 at capacity, a blip): keep it.
    if (!verdict && this._getToken) this._freshToken = true;
    return this._scheduleRetry({ code });
  }

  /**
   * GET /token/check?token=… on the ws URL's host (PROTOCOL §1). Resolves with
   * { error: CODE } for a 401, { ok: true } for a 200, or null when there is no usable
   * answer (no fetch, network error, timeout, another status, a body that is not JSON).
   */
  async _checkToken(token) {
    const fetch = this._fetch;
    if (typeof fetch !== "function") return null;
    const url = `${this.url.replace(/^ws/, "http")}/token/check?token=${encodeURIComponent(token ?? "")}`;
    const abort = typeof AbortController === "function" ? new AbortController() : null;
    let timer;
    const timeout = new Promise((resolve) => {
      timer = setTimeout(() => {
        abort?.abort();
        resolve(null);
      }, this.options.checkTimeoutMs);
    });
    const ask = (async () => {
      const res = await fetch(url, { signal: abort?.signal });
      const body = await res.json();
      if (res.status === 401 && typeof body?.error === "string") return { error: body.error };
      return res.status === 200 ? { ok: true } : null;
    })().catch(() => null);
    try {
      return await Promise.race([ask, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** The server refused `token`: retrying it cannot succeed. */
  async _onAuthError(token, code) {
    const message = AUTH_ERROR_MESSAGES[code] ?? `the server refused the token (${code})`;
    this._emit("auth_error", { code, message });
    if (this._getToken) {
      const gen = this._gen;
      let fresh = null;
      try {
        fresh = await this._getToken({ fresh: true, reason: "auth_error" });
      } catch (err) {
        if (gen !== this._gen || this._stopped) return;
        this._emit("error", { code: "token_unavailable", message: `getToken failed: ${err?.message ?? err}` });
      }
      if (gen !== this._gen || this._stopped) return;
      // The same token again would only be refused again: stop below instead of looping.
      if (fresh && fresh !== token) {
        this._token = fresh;
        this._freshToken = false;
        // At once the first time; if new tokens keep being refused (say the app signs
        // them with another secret than the server's), back off between them.
        if (this._authRenewals++ === 0) return this._open("auth_error");
        return this._scheduleRetry({ code: null });
      }
    }
    // Terminal, like close 4003: no more retries, queued requests fail.
    this._stopped = true;
    this._failOutbox(new RoomcastError("auth_error", `token refused: ${message}`, { authCode: code }));
    this._setState(States.CLOSED);
  }

  /** Forget everything tied to the socket that just went away. */
  _teardown(err) {
    this._ws = null;
    this._ready = false;
    this._clearTimer("connect");
    this._clearTimer("heartbeat");
    this._clearTimer("refresh");
    for (const r of this._rooms.values()) {
      r.joined = false;
      r.joinId = null;
      r.replayLeft = 0;
      clearTimeout(r.retryTimer);
    }
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(err);
      this._pending.delete(id);
    }
    for (const t of this._typing.values()) {
      clearTimeout(t.idle);
      t.active = false;
    }
  }

  _scheduleRetry({ code, delayMs, extra = 0 }) {
    if (this._stopped) return;
    let delay = delayMs;
    if (delay === undefined) {
      const ceiling = Math.min(this.options.maxDelayMs, this.options.baseDelayMs * 2 ** (this._attempt + extra));
      delay = Math.random() * ceiling; // full jitter
      this._attempt += 1;
    }
    delay = Math.round(delay);
    this.nextRetryAt = Date.now() + delay;
    this._setState(States.RECONNECTING);
    this._emit("retry", { delayMs: delay, attempt: this._attempt, code });
    this._clearTimer("retry");
    this._timers.retry = setTimeout(() => this._open("retry"), delay);
  }

  // ---- frames -----------------------------------------------------------------

  _onFrame(ws, data) {
    if (ws !== this._ws) return;
    this._lastHeard = Date.now();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return this._emit("error", { code: "bad_frame", message: "server sent a frame that is not JSON" });
    }
    const { type, id, payload: p = {} } = frame ?? {};
    switch (type) {
      case "welcome":
        return this._onWelcome(p);
      case "joined":
        return this._onJoined(id, p);
      case "message":
        return this._onMessage(p);
      case "lagged":
        return this._onLagged(p);
      case "error":
        return this._onError(id, p);
      case "presence":
        this._emit("presence", p);
        return this._resolve(id, p);
      case "ack":
      case "left":
      case "pong":
      case "refreshed":
        if (type === "left") this._emit("left", p);
        return this._resolve(id, p);
      case "user_joined":
      case "user_left": {
        const r = this._rooms.get(p.room);
        if (r && typeof p.count === "number") r.count = p.count;
        return this._emit(type, p);
      }
      case "direct":
      case "typing":
        return this._emit(type, p);
      default:
        return this._emit("unknown", frame);
    }
  }

  _onWelcome(p) {
    this._clearTimer("connect");
    this._attempt = 0;
    this._authRenewals = 0;
    this._ready = true;
    this.user = p.user ?? null;
    this.connectionId = p.connection_id ?? null;
    this.heartbeatMs = p.heartbeat_ms ?? 0;
    if (typeof p.server_time === "number") this.serverTimeOffsetMs = p.server_time - Date.now();
    this._startHeartbeat();
    this._scheduleRefresh();
    // Re-join first, then flush the outbox: the server handles frames in order, so
    // queued messages find their rooms joined.
    for (const r of this._rooms.values()) if (r.joinId === null) this._sendJoin(r);
    for (const req of this._outbox.splice(0)) {
      clearTimeout(req.timer);
      this._dispatchRequest(req);
    }
    this._emit("welcome", p);
    this._setState(States.OPEN);
  }

  _sendJoin(r, since) {
    const payload = { room: r.name };
    if (r.epoch !== null) {
      payload.since = Math.max(0, since ?? r.lastSeq);
      payload.epoch = r.epoch;
    } else if (r.history) {
      payload.since = 0; // first join: replay whatever backlog the room holds
    }
    const id = this._sendFrame("join", payload, true);
    if (id !== null) {
      r.joinId = id;
      r.sentSince = payload.since;
    }
  }

  _onJoined(id, p) {
    const r = this._rooms.get(p.room);
    if (!r) return; // left while the join was in flight
    const since = r.joinId !== null && r.joinId === id ? r.sentSince : undefined;
    const prevEpoch = r.epoch;
    const missed = p.missed ?? 0;
    const base = p.seq - missed; // the replay (if any) follows, starting after `base`
    r.joinId = null;
    r.joined = true;
    r.count = p.count;

    if (prevEpoch === null) {
      r.lastSeq = base; // first join: only what comes next (and any backlog asked for)
    } else if (prevEpoch !== p.epoch) {
      r.lastSeq = base;
      this._emit("notice", { kind: "gap", reason: "epoch", room: p.room, epoch: p.epoch, previousEpoch: prevEpoch });
    } else if (p.recovered === true) {
      r.lastSeq = Math.max(r.lastSeq, base);
      this._emit("notice", { kind: "recovered", room: p.room, missed });
    } else if (p.recovered === false) {
      if (since !== undefined && since > p.seq) {
        r.lastSeq = base;
        this._emit("notice", { kind: "gap", reason: "reset", room: p.room, seq: p.seq });
      } else {
        const from = r.lastSeq + 1;
        const to = base;
        if (to >= from) this._emit("notice", { kind: "gap", reason: "history", room: p.room, from, to, missed });
        else this._emit("notice", { kind: "recovered", room: p.room, missed });
        r.lastSeq = Math.max(r.lastSeq, base);
      }
    } else {
      r.lastSeq = Math.max(r.lastSeq, base);
    }
    r.epoch = p.epoch;
    r.replayLeft = missed;
    const waiters = r.waiters.splice(0);
    this._emit("joined", p);
    for (const w of waiters) w.resolve(p);
  }

  _onMessage(p) {
    const r = this._rooms.get(p.room);
    if (!r || r.epoch === null || typeof p.seq !== "number") return;
    const replayed = r.replayLeft > 0;
    if (replayed) r.replayLeft -= 1;
    if (p.seq <= r.lastSeq) return; // duplicate (a replay overlapping what we have)
    if (p.seq > r.lastSeq + 1) {
      // A hole: drop this one, the replay of a re-join brings it in order.
      if (r.joinId === null) {
        this._emit("notice", { kind: "gap", reason: "jump", room: p.room, from: r.lastSeq + 1, to: p.seq - 1 });
        this._sendJoin(r);
      }
      return;
    }
    r.lastSeq = p.seq;
    this._emit("message", { ...p, replayed });
  }

  _onLagged(p) {
    const r = this._rooms.get(p.room);
    if (!r) return;
    this._emit("notice", { kind: "lagged", room: p.room, from: p.from_seq, to: p.to_seq });
    if (r.joinId === null && r.epoch !== null) this._sendJoin(r, Math.min(r.lastSeq, p.from_seq - 1));
  }

  _onError(id, p) {
    const detail = { code: p.code, message: p.message, id };
    // A failed join (or re-join)?
    for (const r of this._rooms.values()) {
      if (id === undefined || id === null || r.joinId !== id) continue;
      r.joinId = null;
      detail.request = { type: "join", payload: { room: r.name } };
      const transient = p.code === "rate_limited" || p.code === "unavailable";
      if (FATAL_JOIN_ERRORS.has(p.code) || (r.epoch === null && !transient)) {
        this._rooms.delete(r.name);
        for (const w of r.waiters.splice(0)) w.reject(new RoomcastError(p.code, p.message, { room: r.name }));
      } else {
        // rate_limited / unavailable on a re-join: try again shortly.
        clearTimeout(r.retryTimer);
        r.retryTimer = setTimeout(() => {
          if (this._ready && this._rooms.get(r.name) === r && r.joinId === null && !r.joined) this._sendJoin(r);
        }, this.options.rateLimitDelayMs);
      }
      return this._emit("error", detail);
    }
    const pending = id !== undefined && id !== null ? this._pending.get(id) : undefined;
    if (pending) {
      this._pending.delete(id);
      clearTimeout(pending.timer);
      detail.request = { type: pending.type, payload: pending.payload };
      if (p.code === "rate_limited" && QUEUEABLE.has(pending.type) && pending.tries <= this.options.rateLimitRetries) {
        pending.timer = setTimeout(() => {
          if (this._ready) this._dispatchRequest(pending);
          else pending.reject(new RoomcastError("disconnected", "disconnected while rate limited"));
        }, this.options.rateLimitDelayMs * pending.tries);
        return;
      }
      pending.reject(new RoomcastError(p.code, p.message, { request: detail.request }));
    }
    this._emit("error", detail);
  }

  // ---- requests -----------------------------------------------------------------

  _dispatchRequest(req) {
    req.tries += 1;
    const id = this._sendFrame(req.type, req.payload, true);
    if (id === null) return req.reject(new RoomcastError("not_connected", `${req.type}: not connected`));
    req.timer = setTimeout(() => {
      if (this._pending.get(id) === req) {
        this._pending.delete(id);
        req.reject(new RoomcastError("timeout", `${req.type}: no reply within ${this.options.requestTimeoutMs} ms`));
      }
    }, this.options.requestTimeoutMs);
    this._pending.set(id, req);
  }

  _resolve(id, payload) {
    if (id === undefined || id === null) return;
    const p = this._pending.get(id);
    if (!p) return;
    this._pending.delete(id);
    clearTimeout(p.timer);
    p.resolve(payload);
  }

  /** Write one frame; returns its id (or 0 without one), or null when not connected. */
  _sendFrame(type, payload, withId) {
    const ws = this._ws;
    if (!ws || !this._ready || ws.readyState !== 1) return null;
    const frame = { type, payload };
    let id = 0;
    if (withId) {
      id = `${this._nextId++}`;
      frame.id = id;
    }
    try {
      ws.send(JSON.stringify(frame));
    } catch {
      return null;
    }
    return id;
  }

  _sendTyping(room, isTyping) {
    const r = this._rooms.get(room);
    if (!r || !r.joined) return false;
    return this._sendFrame("typing", { room, is_typing: isTyping }, false) !== null;
  }

  _typingState(room) {
    let t = this._typing.get(room);
    if (!t) {
      t = { active: false, lastSent: 0, idle: null };
      this._typing.set(room, t);
    }
    return t;
  }

  _failOutbox(err) {
    for (const req of this._outbox.splice(0)) {
      clearTimeout(req.timer);
      req.reject(err);
    }
  }

  // ---- timers -------------------------------------------------------------------

  _startHeartbeat() {
    this._clearTimer("heartbeat");
    // Browsers answer the server's WebSocket pings themselves but cannot see them, so a
    // dead link only shows as silence. Ping when quiet; give up after long silence.
    const every = this.heartbeatMs > 0 ? this.heartbeatMs : 30000;
    const tick = Math.max(1000, Math.floor(every / 2));
    this._timers.heartbeat = setInterval(() => {
      const ws = this._ws;
      if (!ws || !this._ready) return;
      const quiet = Date.now() - this._lastHeard;
      if (quiet > 2 * every + 5000) return this._abandon(ws, "no traffic from the server");
      if (quiet >= every / 2) this.request("ping", {}).catch(() => {});
    }, tick);
  }

  _scheduleRefresh() {
    this._clearTimer("refresh");
    if (!this._getToken) return;
    const exp = jwtExp(this._token);
    if (!exp) return;
    const serverNow = Date.now() + this.serverTimeOffsetMs;
    const lifetime = exp * 1000 - serverNow;
    const ms = Math.max(1000, Math.min(lifetime - 60000, lifetime * 0.8));
    this._timers.refresh = setTimeout(async () => {
      let token;
      try {
        token = await this._getToken({ fresh: true, reason: "refresh" });
      } catch (err) {
        return this._emit("error", { code: "token_unavailable", message: `getToken failed: ${err?.message ?? err}` });
      }
      // The same token again means the app cannot renew it: leave it to close 4001.
      if (!this._ready || !token || token === this._token) return;
      this.refresh(token).catch((err) =>
        this._emit("error", { code: err.code ?? "refresh_failed", message: err.message }),
      );
    }, Math.min(ms, 2 ** 31 - 1));
  }

  _clearTimer(name) {
    clearTimeout(this._timers[name]);
    clearInterval(this._timers[name]);
    this._timers[name] = null;
  }

  // ---- helpers ------------------------------------------------------------------

  _joinedInfo(r) {
    return { room: r.name, epoch: r.epoch, lastSeq: r.lastSeq, joined: r.joined, count: r.count };
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** ws(s)://host from a base URL (ws, wss, http, https, or relative to the page). */
function wsBase(url) {
  const loc = globalThis.location;
  let u;
  if (url === undefined || url === null || url === "") {
    if (!loc) throw new TypeError("roomcast: pass `url` outside a browser");
    u = new URL(loc.href);
  } else {
    u = new URL(url, loc?.href);
  }
  const scheme = u.protocol === "https:" || u.protocol === "wss:" ? "wss:" : "ws:";
  return `${scheme}//${u.host}${u.pathname.replace(/\/+$/, "").replace(/\/ws$/, "")}`;
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = null;
  // Not null: Node's `ws` package throws an error event that has no listener (close()
  // while connecting emits one).
  ws.onerror = () => {};
}

/** The `exp` claim of a JWT (seconds), or null. The client does not verify tokens. */
export function jwtExp(token) {
  const claims = jwtClaims(token);
  return claims && typeof claims.exp === "number" ? claims.exp : null;
}

/** The claims of a JWT, unverified, or null. */
export function jwtClaims(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
    const json = decodeURIComponent(
      Array.from(atob(b64), (c) => `%${c.charCodeAt(0).toString(16).padStart(2, "0")}`).join(""),
    );
    return JSON.parse(json);
  } catch {
    return null;
  }
}

export default RoomcastClient;
