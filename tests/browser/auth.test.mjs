// web/roomcast.js under Node against the real roomcast binary: a refused token ends
// in `auth_error` and state "closed" instead of endless retries, and with getToken
// the client swaps in a fresh token and gets in. No fake socket: the connections
// are the runtime's WebSocket, only wrapped to count them.
//
//   node --test tests/browser/auth.test.mjs            (ROOMCAST_BIN=… or argv for the binary)
//
// Needs a global WebSocket: Node 22+, or Node 20.10+ with --experimental-websocket
// (tests/browser.rs passes the flag when needed).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { once } from "node:events";
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { RoomcastClient } from "../../web/roomcast.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "..", "..");
const ARG = process.argv.slice(2).find((a) => !a.startsWith("-") && !a.endsWith(".mjs"));
const BIN = path.resolve(ARG || process.env.ROOMCAST_BIN || path.join(REPO, "target", "debug", "roomcast"));
const SECRET = "auth-test-secret-0123456789abcdef0123"; // 32+ bytes: no short-secret warning
const WAIT_MS = 10000; // per test: a client that never gives up fails here instead of hanging

let server; // { child, addr }

before(async () => {
  assert.ok(fs.existsSync(BIN), `roomcast binary not found at ${BIN}: run \`cargo build\` first, or set ROOMCAST_BIN`);
  assert.equal(
    typeof globalThis.WebSocket,
    "function",
    `Node ${process.versions.node} has no global WebSocket: use Node 22+, or run node --experimental-websocket (20.10+)`,
  );
  const child = spawn(BIN, ["--listen", "127.0.0.1:0", "--jwt-secret", SECRET], { stdio: ["ignore", "pipe", "pipe"] });
  const stderr = [];
  readline.createInterface({ input: child.stderr }).on("line", (line) => stderr.push(line));
  const lines = readline.createInterface({ input: child.stdout });
  const first = await Promise.race([
    once(lines, "line").then(([line]) => line),
    once(child, "exit").then(([code]) => {
      throw new Error(`roomcast exited (${code}) before its banner:\n${stderr.join("\n")}`);
    }),
  ]);
  lines.on("line", () => {}); // keep draining stdout
  const m = /^roomcast listening on http:\/\/(\S+)$/.exec(first);
  if (!m) process.kill(child.pid, "SIGKILL");
  assert.ok(m, `unexpected first stdout line from roomcast: ${JSON.stringify(first)}`);
  server = { child, addr: m[1] };
});

after(() => {
  if (server && server.child.exitCode === null) process.kill(server.child.pid, "SIGKILL");
});

// ---- helpers --------------------------------------------------------------------

/** An HS256 JWT signed here, so a test can make any token it needs without waiting. */
function jwt(claims, secret = SECRET) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** A good token from the binary itself (`roomcast token`). */
function mint(sub, name) {
  return execFileSync(BIN, ["token", "--secret", SECRET, "--sub", sub, "--name", name], { encoding: "utf8" }).trim();
}

/** The runtime's WebSocket, counting every connection attempt. */
function countingWebSocket() {
  const urls = [];
  class Counting extends globalThis.WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      urls.push(url);
    }
  }
  return { WebSocket: Counting, urls };
}

/** Resolves with the detail of the client's next `type` event. */
function next(client, type) {
  return new Promise((resolve) => {
    const off = client.on(type, (detail) => {
      off();
      resolve(detail);
    });
  });
}

/** Resolves once the client's state is `state`. */
function reaches(client, state) {
  if (client.state === state) return Promise.resolve();
  return new Promise((resolve) => {
    const off = client.on("state", (d) => {
      if (d.state === state) {
        off();
        resolve();
      }
    });
  });
}

function newClient(t, options) {
  const client = new RoomcastClient({ url: `http://${server.addr}`, baseDelayMs: 20, maxDelayMs: 50, ...options });
  t.after(() => client.close());
  return client;
}

/** A refused token: auth_error with `code`, state "closed", one connection only. */
async function expectRefused(t, token, code) {
  const counting = countingWebSocket();
  const client = newClient(t, { token, WebSocket: counting.WebSocket });
  const retries = [];
  client.on("retry", (r) => retries.push(r));
  await reaches(client, "connecting");
  const queued = assert.rejects(client.send("lobby", "hi"), (err) => err.code === "auth_error" && err.authCode === code);
  const [authError] = await Promise.all([next(client, "auth_error"), reaches(client, "closed")]);
  assert.equal(authError.code, code);
  assert.match(authError.message, /\w+ \w+/, "a human sentence");
  await queued;
  // With 20-50 ms backoff, a retry would have happened within this wait: none may.
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(counting.urls.length, 1, `connection attempts: ${counting.urls.length}`);
  assert.deepEqual(retries, []);
  assert.equal(client.state, "closed");
  assert.equal(client.nextRetryAt, null);
  return authError;
}

// ---- tests ----------------------------------------------------------------------

test("under Node, `url` is required (there is no page location)", () => {
  assert.throws(() => new RoomcastClient({ token: "x", autoConnect: false }), /pass `url`/);
});

test("a wrongly signed token: auth_error bad_signature, closed, no further attempts", { timeout: WAIT_MS }, async (t) => {
  const token = jwt({ sub: "mallory", exp: Math.floor(Date.now() / 1000) + 600 }, "another-secret-0123456789abcdef012345");
  const { message } = await expectRefused(t, token, "bad_signature");
  assert.match(message, /signed/);
});

test("an expired token: auth_error expired", { timeout: WAIT_MS }, async (t) => {
  const token = jwt({ sub: "old", exp: Math.floor(Date.now() / 1000) - 120 });
  const { message } = await expectRefused(t, token, "expired");
  assert.equal(message, "the token has expired");
});

test("with getToken: a bad first token is replaced by getToken({ fresh: true, reason: 'auth_error' })", { timeout: WAIT_MS }, async (t) => {
  const good = mint("carol", "Carol");
  const calls = [];
  const counting = countingWebSocket();
  const client = newClient(t, {
    token: "not-a-jwt",
    getToken: async (info) => {
      calls.push(info);
      return good;
    },
    WebSocket: counting.WebSocket,
  });
  const authErrors = [];
  client.on("auth_error", (e) => authErrors.push(e));
  const [welcome] = await Promise.all([next(client, "welcome"), reaches(client, "open")]);
  assert.deepEqual(calls, [{ fresh: true, reason: "auth_error" }]);
  assert.deepEqual(authErrors.map((e) => e.code), ["malformed"]);
  assert.deepEqual(welcome.user, { id: "carol", name: "Carol" });
  assert.equal(counting.urls.length, 2);
  assert.ok(counting.urls[1].endsWith(`token=${encodeURIComponent(good)}`));
  // A real session: join and publish.
  await client.join("lobby");
  const ack = await client.send("lobby", { text: "in at last" });
  assert.equal(ack.seq, 1);
});

test("with getToken giving the same refused token again: closed, no loop", { timeout: WAIT_MS }, async (t) => {
  const bad = jwt({ sub: "old", exp: Math.floor(Date.now() / 1000) - 120 });
  const calls = [];
  const counting = countingWebSocket();
  const client = newClient(t, {
    token: bad,
    getToken: async (info) => {
      calls.push(info);
      return bad;
    },
    WebSocket: counting.WebSocket,
  });
  const [authError] = await Promise.all([next(client, "auth_error"), reaches(client, "closed")]);
  assert.equal(authError.code, "expired");
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.deepEqual(calls, [{ fresh: true, reason: "auth_error" }]);
  assert.equal(counting.urls.length, 1);
  assert.equal(client.state, "closed");
});
