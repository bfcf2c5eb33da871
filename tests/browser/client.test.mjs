// Unit tests of web/roomcast.js against a scripted fake WebSocket: reconnect and
// backoff, close codes, recovery with since/epoch, exactly-once in-order delivery,
// lagged, the outbox, request promises, typing, and what GET /token/check's answer
// does after a refused connection (a scripted fetch). No browser, no server.
//
//   node --test tests/browser/client.test.mjs

import { test } from "node:test";
import assert from "node:assert/strict";
import { RoomcastClient, RoomcastError, jwtExp } from "../../web/roomcast.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    assert.equal(this.readyState, 1, "send on a socket that is not open");
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }
  // ---- the "server" side ----
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  welcome(user = { id: "alice", name: "Alice" }) {
    this.open();
    this.push("welcome", { connection_id: "c1", user, heartbeat_ms: 30000, server_time: Date.now() });
  }
  push(type, payload, id) {
    this.onmessage?.({ data: JSON.stringify(id === undefined ? { type, payload } : { type, id, payload }) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
  refuse() {
    this.serverClose(1006, "");
  }
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
  last(type) {
    return this.frames(type).at(-1);
  }
  /** Answer the last `join` for `room` the way the server would. */
  joined(room, { seq, epoch = "E1", count = 1, recovered, missed } = {}) {
    const req = this.sent.filter((f) => f.type === "join" && f.payload.room === room).at(-1);
    assert.ok(req, `no join for ${room}`);
    const payload = { room, count, seq, epoch };
    if (recovered !== undefined) Object.assign(payload, { recovered, missed });
    this.push("joined", payload, req.id);
    return req;
  }
  message(room, seq, text = `m${seq}`) {
    this.push("message", { room, seq, user: { id: "bob", name: "Bob" }, content: { text }, ts: 1767225600000 + seq });
  }
}

const latest = () => FakeSocket.all.at(-1);

/** A scripted fetch for GET /token/check: `answer(url)` gives a Response or throws. The
 * default answers like an unreachable server, so tests that do not care keep the backoff. */
function fakeFetch(answer = () => Promise.reject(new TypeError("fetch failed"))) {
  const f = async (url) => {
    f.urls.push(url);
    return answer(url);
  };
  f.urls = [];
  return f;
}
const json = (status, body) => new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(cond, what, ms = 2000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await tick(2);
  }
}

function makeClient(t, options = {}) {
  const seen = { messages: [], notices: [], states: [], retries: [], errors: [], authErrors: [] };
  const before = latest(); // the last socket of an earlier test
  const client = new RoomcastClient({
    url: "http://chat.example:8080",
    token: "t0",
    WebSocket: FakeSocket,
    fetch: fakeFetch(),
    baseDelayMs: 5,
    maxDelayMs: 40,
    ...options,
  });
  client.on("message", (m) => seen.messages.push(`${m.room}:${m.seq}`));
  client.on("notice", (n) => seen.notices.push(n));
  client.on("state", ({ state }) => seen.states.push(state));
  client.on("retry", (r) => seen.retries.push(r));
  client.on("error", (e) => seen.errors.push(e));
  client.on("auth_error", (e) => seen.authErrors.push(e));
  t.after(() => client.close());
  return { client, seen, before };
}

async function connected(t, options) {
  const made = makeClient(t, options);
  await until(() => latest()?.onmessage, "a socket");
  const ws = latest();
  ws.welcome();
  return { ...made, ws };
}

test("connects to ws://host/ws?token=…, opens on welcome, join resolves with joined", async (t) => {
  const { client, ws, seen } = await connected(t, { token: "a b" });
  assert.equal(ws.url, "ws://chat.example:8080/ws?token=a%20b");
  assert.deepEqual(seen.states, ["connecting", "open"]);
  const joining = client.join("lobby");
  assert.deepEqual(ws.last("join").payload, { room: "lobby" });
  ws.joined("lobby", { seq: 3, count: 2 });
  const joined = await joining;
  assert.equal(joined.seq, 3);
  assert.deepEqual(client.roomState("lobby"), { room: "lobby", epoch: "E1", lastSeq: 3, joined: true, count: 2 });
});

test("https base gives wss; history join asks for the backlog with since 0", async (t) => {
  const { client, ws } = await connected(t, { url: "https://chat.example/" });
  assert.ok(ws.url.startsWith("wss://chat.example/ws?token="));
  client.join("lobby", { history: true });
  assert.deepEqual(ws.last("join").payload, { room: "lobby", since: 0 });
});

test("delivers each message once and in order; a seq jump re-joins with since/epoch", async (t) => {
  const { client, ws, seen } = await connected(t);
  client.join("lobby");
  ws.joined("lobby", { seq: 3, epoch: "E1" });
  ws.message("lobby", 4);
  ws.message("lobby", 4); // duplicate
  ws.message("lobby", 5);
  ws.message("lobby", 7); // 6 is missing
  assert.deepEqual(ws.last("join").payload, { room: "lobby", since: 5, epoch: "E1" });
  assert.equal(seen.notices.at(-1).kind, "gap");
  assert.equal(seen.notices.at(-1).reason, "jump");
  ws.message("lobby", 8); // live, while the re-join is in flight: dropped, the replay has it
  ws.joined("lobby", { seq: 8, epoch: "E1", recovered: true, missed: 3 });
  for (const s of [6, 7, 8]) ws.message("lobby", s);
  ws.message("lobby", 9);
  assert.deepEqual(seen.messages, ["lobby:4", "lobby:5", "lobby:6", "lobby:7", "lobby:8", "lobby:9"]);
  assert.deepEqual(seen.notices.at(-1), { kind: "recovered", room: "lobby", missed: 3 });
  assert.equal(ws.frames("join").length, 2, "one re-join only");
});

test("lagged re-joins with since: from_seq - 1", async (t) => {
  const { client, ws, seen } = await connected(t);
  client.join("feed");
  ws.joined("feed", { seq: 10, epoch: "E9" });
  ws.message("feed", 11);
  ws.push("lagged", { room: "feed", from_seq: 12, to_seq: 20 });
  assert.deepEqual(ws.last("join").payload, { room: "feed", since: 11, epoch: "E9" });
  ws.joined("feed", { seq: 20, epoch: "E9", recovered: true, missed: 9 });
  for (let s = 12; s <= 20; s += 1) ws.message("feed", s);
  assert.equal(seen.messages.length, 10);
  assert.equal(seen.messages.at(-1), "feed:20");
});

test("close 4000: reconnects, re-joins every room with since/epoch, recovers without duplicates", async (t) => {
  const { client, ws, seen } = await connected(t);
  client.join("a");
  client.join("b");
  ws.joined("a", { seq: 2, epoch: "EA" });
  ws.joined("b", { seq: 0, epoch: "EB" });
  ws.message("a", 3);
  ws.serverClose(4000, "slow consumer");
  assert.equal(client.state, "reconnecting");
  await until(() => FakeSocket.all.at(-1) !== ws, "a new socket");
  const ws2 = latest();
  ws2.welcome();
  const joins = ws2.frames("join").map((f) => f.payload);
  assert.deepEqual(joins, [
    { room: "a", since: 3, epoch: "EA" },
    { room: "b", since: 0, epoch: "EB" },
  ]);
  ws2.joined("a", { seq: 5, epoch: "EA", recovered: true, missed: 3 }); // replays 3 (dup), 4, 5
  ws2.message("a", 3);
  ws2.message("a", 4);
  ws2.message("a", 5);
  ws2.joined("b", { seq: 0, epoch: "EB", recovered: true, missed: 0 });
  assert.deepEqual(seen.messages, ["a:3", "a:4", "a:5"]);
  assert.deepEqual(
    seen.notices.filter((n) => n.kind === "recovered").map((n) => [n.room, n.missed]),
    [["a", 3], ["b", 0]],
  );
  assert.deepEqual(seen.states, ["connecting", "open", "reconnecting", "open"]);
});

test("a changed epoch or lost history is reported as a gap", async (t) => {
  const { client, ws, seen } = await connected(t);
  client.join("x");
  client.join("y");
  ws.joined("x", { seq: 40, epoch: "OLD" });
  ws.joined("y", { seq: 10, epoch: "EY" });
  ws.serverClose(1011, "");
  await until(() => latest() !== ws, "a new socket");
  const ws2 = latest();
  ws2.welcome();
  ws2.joined("x", { seq: 2, epoch: "NEW", recovered: false, missed: 0 });
  ws2.message("x", 3);
  ws2.joined("y", { seq: 150, epoch: "EY", recovered: false, missed: 100 }); // 11..50 fell out
  ws2.message("y", 51);
  const gaps = seen.notices.filter((n) => n.kind === "gap");
  assert.equal(gaps[0].reason, "epoch");
  assert.deepEqual([gaps[1].reason, gaps[1].from, gaps[1].to], ["history", 11, 50]);
  assert.deepEqual(seen.messages, ["x:3", "y:51"]);
});

test("close 4003 does not reconnect", async (t) => {
  const { client, ws, seen } = await connected(t);
  const count = FakeSocket.all.length;
  ws.serverClose(4003, "disconnected");
  await tick(60);
  assert.equal(FakeSocket.all.length, count);
  assert.equal(client.state, "closed");
  assert.equal(seen.notices.at(-1).kind, "disconnected");
});

test("close 4001 gets a fresh token first, then reconnects", async (t) => {
  const calls = [];
  const { ws } = await connected(t, {
    token: undefined,
    getToken: async ({ fresh }) => {
      calls.push(fresh);
      return fresh ? "new-token" : "old-token";
    },
  });
  assert.ok(ws.url.endsWith("token=old-token"));
  ws.serverClose(4001, "token expired");
  await until(() => latest() !== ws, "a new socket");
  assert.deepEqual(calls, [false, true]);
  assert.ok(latest().url.endsWith("token=new-token"));
});

test("close 1001 waits for the retry_ms hint", async (t) => {
  const { ws, seen } = await connected(t);
  const before = Date.now();
  ws.serverClose(1001, "server shutting down; retry_ms=80");
  assert.equal(seen.retries.at(-1).delayMs, 80);
  assert.equal(seen.notices.at(-1).kind, "shutdown");
  await until(() => latest() !== ws, "a new socket", 1000);
  assert.ok(Date.now() - before >= 75, "reconnected before the hint");
});

test("backoff is exponential with full jitter, capped, and resets on welcome", async (t) => {
  const random = Math.random;
  t.after(() => (Math.random = random));
  const draws = [0.999, 0.5, 0.999, 0.999, 0.999, 0.999, 0.0];
  Math.random = () => draws.shift() ?? 0.999;
  const { client, seen } = makeClient(t, { baseDelayMs: 5, maxDelayMs: 40 });
  for (let i = 0; i < 7; i += 1) {
    await until(() => latest()?.onclose && latest().readyState === 0, "a connection attempt");
    latest().refuse();
    if (i < 6) await until(() => latest().readyState === 0, "the next attempt", 1000);
  }
  await until(() => seen.retries.length === 7, "the retry after the last refusal (after its /token/check)");
  // ceilings 5, 10, 20, 40, 40 (cap), 40, 40
  assert.deepEqual(
    seen.retries.map((r) => r.delayMs),
    [5, 5, 20, 40, 40, 40, 0],
  );
  await until(() => latest().readyState === 0 && latest().onmessage, "the next attempt");
  latest().welcome();
  latest().serverClose(1006, "");
  assert.ok(seen.retries.at(-1).delayMs <= 5, "attempts reset after a welcome");
  assert.equal(client.state, "reconnecting");
});

test("requests: promises resolve with replies, reject on errors and on disconnect", async (t) => {
  const { client, ws } = await connected(t);
  client.join("lobby");
  ws.joined("lobby", { seq: 0 });
  const sending = client.send("lobby", { text: "hi" });
  const frame = ws.last("message");
  assert.deepEqual(frame.payload, { room: "lobby", content: { text: "hi" } });
  ws.push("ack", { seq: 1 }, frame.id);
  assert.deepEqual(await sending, { seq: 1 });

  const dm = client.direct("carol", "yo");
  ws.push("error", { code: "user_offline", message: "carol is offline" }, ws.last("direct").id);
  await assert.rejects(dm, (err) => err instanceof RoomcastError && err.code === "user_offline");

  const who = client.presence("lobby");
  ws.push("presence", { room: "lobby", users: [{ id: "alice", name: "Alice", connections: 2 }] }, ws.last("presence").id);
  assert.equal((await who).users[0].connections, 2);

  const ping = client.ping();
  ws.push("pong", { server_time: 1 }, ws.last("ping").id);
  assert.equal((await ping).server_time, 1);

  const lost = client.presence("lobby");
  ws.serverClose(1006, "");
  await assert.rejects(lost, (err) => err.code === "disconnected");
  await assert.rejects(client.presence("lobby"), (err) => err.code === "not_connected");
});

test("messages sent while disconnected wait in the outbox and go out after the re-join", async (t) => {
  const { client, ws } = await connected(t);
  client.join("lobby");
  ws.joined("lobby", { seq: 4, epoch: "E" });
  ws.serverClose(1006, "");
  const sending = client.send("lobby", "queued");
  await until(() => latest() !== ws, "a new socket");
  const ws2 = latest();
  ws2.welcome();
  assert.deepEqual(ws2.sent.map((f) => f.type), ["join", "message"]);
  ws2.push("ack", { seq: 5 }, ws2.last("message").id);
  assert.deepEqual(await sending, { seq: 5 });
});

test("typing: true on input (repeated while typing), false when idle and before a send", async (t) => {
  const { client, ws } = await connected(t, { typingIdleMs: 40, typingRefreshMs: 20 });
  client.join("lobby");
  ws.joined("lobby", { seq: 0 });
  const typing = () => ws.frames("typing").map((f) => f.payload.is_typing);
  client.typingInput("lobby");
  client.typingInput("lobby");
  assert.deepEqual(typing(), [true]);
  assert.equal(ws.last("typing").id, undefined, "typing frames carry no id");
  await tick(25);
  client.typingInput("lobby");
  assert.deepEqual(typing(), [true, true]);
  await until(() => typing().length === 3, "typing false after idle");
  assert.deepEqual(typing(), [true, true, false]);
  client.typingInput("lobby");
  client.send("lobby", "done").catch(() => {});
  assert.deepEqual(ws.sent.slice(-2).map((f) => f.type), ["typing", "message"]);
  assert.deepEqual(typing(), [true, true, false, true, false]);
  client.typingInput("nowhere"); // not joined: nothing sent
  assert.equal(typing().length, 5);
});

test("leave forgets the room: no re-join after a reconnect", async (t) => {
  const { client, ws } = await connected(t);
  client.join("a");
  client.join("b");
  ws.joined("a", { seq: 0 });
  ws.joined("b", { seq: 0 });
  const leaving = client.leave("a");
  ws.push("left", { room: "a" }, ws.last("leave").id);
  assert.deepEqual(await leaving, { room: "a" });
  ws.serverClose(1006, "");
  await until(() => latest() !== ws, "a new socket");
  latest().welcome();
  assert.deepEqual(latest().frames("join").map((f) => f.payload.room), ["b"]);
});

test("a forbidden join rejects and is not retried", async (t) => {
  const { client, ws } = await connected(t);
  const joining = client.join("secret");
  ws.push("error", { code: "forbidden", message: "no" }, ws.last("join").id);
  await assert.rejects(joining, (err) => err.code === "forbidden");
  assert.deepEqual(client.rooms(), []);
});

test("jwtExp reads the exp claim", () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  assert.equal(jwtExp(`${b64({ alg: "HS256" })}.${b64({ sub: "a", exp: 1234 })}.sig`), 1234);
  assert.equal(jwtExp("nonsense"), null);
});

// ---- a refused connection: GET /token/check ------------------------------------

/** Wait for the next attempt after `previous` and refuse it (as a browser reports a
 * refused upgrade). */
async function refuseNext(previous) {
  await until(() => latest() !== previous && latest()?.onclose, "a connection attempt");
  const ws = latest();
  ws.refuse();
  return ws;
}

test("a refused connection asks /token/check once; 200 keeps the backoff and the token", async (t) => {
  const fetch = fakeFetch(() => json(200, { user: { id: "alice", name: "Alice" }, exp: null }));
  const { client, seen, before } = makeClient(t, { url: "https://chat.example/", token: "a b+c", fetch });
  const first = await refuseNext(before);
  await until(() => seen.retries.length === 1, "a retry");
  assert.deepEqual(fetch.urls, ["https://chat.example/token/check?token=a%20b%2Bc"]);
  await until(() => latest() !== first, "the next attempt");
  assert.equal(latest().url, first.url, "the same token again");
  latest().welcome();
  latest().serverClose(1006, ""); // after open: no check
  assert.equal(fetch.urls.length, 1);
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(seen.authErrors, []);
});

test("no usable answer from /token/check (network error, 5xx, not JSON, no fetch) keeps the backoff", async (t) => {
  const answers = [
    () => Promise.reject(new TypeError("fetch failed")),
    () => json(503, { error: "unavailable" }),
    () => new Response("<html>401</html>", { status: 401 }),
    null, // no fetch at all
  ];
  for (const answer of answers) {
    const fetch = answer ? fakeFetch(answer) : undefined;
    const saved = globalThis.fetch;
    if (!answer) globalThis.fetch = undefined;
    try {
      const { client, seen, before } = makeClient(t, { fetch });
      const refused = await refuseNext(before);
      await until(() => seen.retries.length === 1, "a retry");
      await until(() => latest() !== refused, "the next attempt");
      assert.equal(client.state, "reconnecting");
      assert.deepEqual(seen.authErrors, []);
      client.close();
    } finally {
      globalThis.fetch = saved;
    }
  }
});

test("401 without getToken: auth_error, closed, queued messages rejected, no more attempts", async (t) => {
  const fetch = fakeFetch(() => json(401, { error: "expired" }));
  const { client, seen, before } = makeClient(t, { fetch });
  await until(() => latest() !== before, "a connection attempt");
  const queued = assert.rejects(client.send("lobby", "hi"), (err) => err.code === "auth_error" && err.authCode === "expired");
  const refused = await refuseNext(before);
  await until(() => client.state === "closed", "state closed");
  assert.deepEqual(seen.authErrors, [{ code: "expired", message: "the token has expired" }]);
  await queued; // the message that waited in the outbox is rejected
  await tick(60);
  assert.equal(latest(), refused, "no attempt after the refusal");
  assert.deepEqual(seen.retries, []);
  assert.equal(fetch.urls.length, 1);
});

test("401 with getToken: one fresh token, at once, then open", async (t) => {
  const calls = [];
  const tokens = ["bad", "good"];
  const fetch = fakeFetch(() => json(401, { error: "bad_signature" }));
  const { client, seen, before } = makeClient(t, {
    token: undefined,
    getToken: async (info) => {
      calls.push(info);
      return tokens.shift();
    },
    fetch,
  });
  const refused = await refuseNext(before);
  assert.ok(refused.url.endsWith("token=bad"));
  await until(() => latest() !== refused, "a connection with the new token");
  assert.ok(latest().url.endsWith("token=good"));
  assert.deepEqual(calls, [{ fresh: false, reason: "connect" }, { fresh: true, reason: "auth_error" }]);
  assert.deepEqual(seen.retries, [], "no backoff before the new token");
  assert.equal(seen.authErrors[0].code, "bad_signature");
  latest().welcome();
  assert.equal(client.state, "open");
});

test("401 with getToken: the same token again (or a getToken failure) stops without looping", async (t) => {
  for (const again of [async () => "bad", async () => Promise.reject(new Error("offline"))]) {
    const calls = [];
    const fetch = fakeFetch(() => json(401, { error: "invalid_claims" }));
    const { client, seen, before } = makeClient(t, {
      token: "bad",
      getToken: (info) => {
        calls.push(info);
        return again();
      },
      fetch,
    });
    const refused = await refuseNext(before);
    await until(() => client.state === "closed", "state closed");
    await tick(60);
    assert.equal(latest(), refused, "no attempt after the refusal");
    assert.deepEqual(calls, [{ fresh: true, reason: "auth_error" }]);
    assert.deepEqual(seen.retries, []);
    assert.equal(seen.authErrors.length, 1);
  }
});

test("new tokens that keep being refused are tried with backoff, not in a tight loop", async (t) => {
  let n = 0;
  const { seen, before } = makeClient(t, {
    token: "t0",
    getToken: async () => `t${++n}`,
    fetch: fakeFetch(() => json(401, { error: "bad_signature" })),
  });
  let ws = await refuseNext(before);
  await until(() => latest() !== ws, "the first renewal");
  assert.deepEqual(seen.retries, [], "the first new token goes at once");
  ws = latest();
  ws.refuse();
  await until(() => seen.retries.length === 1, "backoff before the second renewal");
  assert.equal(seen.authErrors.length, 2);
});
