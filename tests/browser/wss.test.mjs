// web/roomcast.js under Node against the real roomcast binary serving TLS
// (PROTOCOL §13): the client reaches it with a `wss://` and an `https://` base
// URL, messages flow between two clients, and a refused token is explained
// through `/token/check` over https. The certificate is made by the Rust side
// (tests/browser.rs, rcgen) and trusted through NODE_EXTRA_CA_CERTS, so
// nothing here turns verification off.
//
//   ROOMCAST_TEST_CERT=… ROOMCAST_TEST_KEY=… NODE_EXTRA_CA_CERTS=… \
//     node --test tests/browser/wss.test.mjs

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
const BIN = path.resolve(process.env.ROOMCAST_BIN || path.join(REPO, "target", "debug", "roomcast"));
const CERT = process.env.ROOMCAST_TEST_CERT;
const KEY = process.env.ROOMCAST_TEST_KEY;
const SECRET = "wss-test-secret-0123456789abcdef012345";
const WAIT_MS = 10000;

let server; // { child, port }

before(async () => {
  assert.ok(CERT && KEY, "set ROOMCAST_TEST_CERT and ROOMCAST_TEST_KEY (tests/browser.rs does)");
  assert.ok(fs.existsSync(BIN), `roomcast binary not found at ${BIN}`);
  assert.equal(typeof globalThis.WebSocket, "function", "this Node has no global WebSocket");
  const child = spawn(
    BIN,
    ["--listen", "127.0.0.1:0", "--jwt-secret", SECRET, "--tls-cert", CERT, "--tls-key", KEY],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  const stderr = [];
  readline.createInterface({ input: child.stderr }).on("line", (line) => stderr.push(line));
  const lines = readline.createInterface({ input: child.stdout });
  const first = await Promise.race([
    once(lines, "line").then(([line]) => line),
    once(child, "exit").then(([code]) => {
      throw new Error(`roomcast exited (${code}) before its banner:\n${stderr.join("\n")}`);
    }),
  ]);
  lines.on("line", () => {});
  const m = /^roomcast listening on https:\/\/127\.0\.0\.1:(\d+)$/.exec(first);
  if (!m) process.kill(child.pid, "SIGKILL");
  assert.ok(m, `expected an https banner, got ${JSON.stringify(first)}`);
  server = { child, port: Number(m[1]) };
});

after(() => {
  if (server && server.child.exitCode === null) process.kill(server.child.pid, "SIGKILL");
});

function mint(sub, name) {
  return execFileSync(BIN, ["token", "--secret", SECRET, "--sub", sub, "--name", name], { encoding: "utf8" }).trim();
}

function next(client, type) {
  return new Promise((resolve) => {
    const off = client.on(type, (detail) => {
      off();
      resolve(detail);
    });
  });
}

function newClient(t, options) {
  const client = new RoomcastClient({ baseDelayMs: 20, maxDelayMs: 50, ...options });
  t.after(() => client.close());
  return client;
}

test("over wss:// and https:// base URLs: welcome, join and a message from one client to another", { timeout: WAIT_MS }, async (t) => {
  const alice = newClient(t, { url: `wss://localhost:${server.port}`, token: mint("alice", "Alice") });
  const bob = newClient(t, { url: `https://localhost:${server.port}`, token: mint("bob", "Bob") });
  const [aliceWelcome, bobWelcome] = await Promise.all([next(alice, "welcome"), next(bob, "welcome")]);
  assert.deepEqual(aliceWelcome.user, { id: "alice", name: "Alice" });
  assert.deepEqual(bobWelcome.user, { id: "bob", name: "Bob" });
  await alice.join("lobby");
  await bob.join("lobby");
  const received = next(bob, "message");
  const ack = await alice.send("lobby", { text: "over TLS" });
  const message = await received;
  assert.equal(message.room, "lobby");
  assert.equal(message.seq, ack.seq);
  assert.deepEqual(message.content, { text: "over TLS" });
});

test("a refused token over TLS: auth_error with the reason from /token/check over https", { timeout: WAIT_MS }, async (t) => {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: "old", exp: Math.floor(Date.now() / 1000) - 120 })}`;
  const expired = `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
  const client = newClient(t, { url: `wss://localhost:${server.port}`, token: expired });
  const authError = await next(client, "auth_error");
  assert.equal(authError.code, "expired");
});
