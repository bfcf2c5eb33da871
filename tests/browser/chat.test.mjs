// End-to-end test of the demo page (web/index.html) and its client (web/roomcast.js)
// in headless Chromium, against the real roomcast binary.
//
//   node tests/browser/chat.test.mjs [path/to/roomcast]     (or ROOMCAST_BIN=…)
//
// It starts roomcast on a free loopback port with a JWT secret, an API key, a state
// file and a short typing timeout; mints tokens for Alice and Bob with `roomcast
// token`; opens one browser per user on http://ADDR/?token=…; then checks chat both
// ways (with names), the typing indicator (shown, then cleared by the server's
// timeout and by sending), presence with connection counts, a direct message, and a
// server restart in the middle of a backend's publishing: SIGTERM (state saved, exit
// 0), publishes refused while it is down, restart on the same port with the same
// state file, more publishes; both pages must reconnect by themselves, recover with
// since/epoch and show every accepted message exactly once, in seq order. Then a
// refused token (garbage, expired) must show why and offer the token form again, and
// in demo mode (no secret) the guest-name form, which also signs in a guest to chat.
// Screenshots go to target/browser/{alice,bob,bad-token,bad-token-demo}.png. Exit status 0 only if
// all passed.

import { spawn, execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { once } from "node:events";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "..", "..");
const BIN = path.resolve(process.argv[2] || process.env.ROOMCAST_BIN || path.join(REPO, "target", "debug", "roomcast"));
const CHROMIUM = process.env.ROOMCAST_CHROMIUM || "/usr/bin/chromium";
const SHOTS = path.join(REPO, "target", "browser");
const SECRET = "browser-test-secret-of-32-bytes!";
const API_KEY = "browser-test-key";
const TYPING_TIMEOUT_MS = 1500;
const WAIT_MS = Number(process.env.ROOMCAST_BROWSER_TIMEOUT_MS || 30000); // any single DOM condition
const RECOVERY_WAIT_MS = 60000; // reconnect (backoff up to a few seconds) and recovery

// ---------------------------------------------------------------------------------

const log = (...args) => console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...args);
class TestFailure extends Error {}
function check(condition, message) {
  if (!condition) throw new TestFailure(message);
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "roomcast-browser-"));
const stateFile = path.join(tmp, "state.json");
let server = null; // the main server: { child, addr, stderr: string[], exited: Promise }
const children = []; // every roomcast process started, killed (by PID) at the end
const browsers = [];

function serverFlags(listen) {
  return [
    "--listen", listen,
    "--jwt-secret", SECRET,
    "--api-key", API_KEY,
    "--state-file", stateFile,
    "--typing-timeout-ms", String(TYPING_TIMEOUT_MS),
  ];
}

/** Start roomcast (by default the main server); resolves once its banner names the address. */
async function startServer(listen, flags = serverFlags(listen)) {
  const child = spawn(BIN, flags, { stdio: ["ignore", "pipe", "pipe"] });
  children.push(child);
  const stderr = [];
  const keep = (line) => {
    stderr.push(line);
    if (stderr.length > 200) stderr.shift();
  };
  readline.createInterface({ input: child.stderr }).on("line", keep);
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  const lines = readline.createInterface({ input: child.stdout });
  const first = await Promise.race([
    once(lines, "line").then(([line]) => line),
    exited.then(({ code, signal }) => {
      throw new TestFailure(`roomcast exited before its banner (code ${code}, signal ${signal}):\n${stderr.join("\n")}`);
    }),
    sleep(15000).then(() => {
      throw new TestFailure("roomcast printed no banner within 15 s");
    }),
  ]);
  lines.on("line", () => {}); // keep draining stdout
  const m = /^roomcast listening on http:\/\/(\S+)$/.exec(first);
  if (!m) {
    child.kill("SIGKILL");
    throw new TestFailure(`unexpected first stdout line from roomcast: ${JSON.stringify(first)}`);
  }
  log(`roomcast pid ${child.pid} listening on ${m[1]}`);
  const started = { child, addr: m[1], stderr, exited };
  if (flags.includes("--jwt-secret")) server = started;
  return started;
}

/** Restart on the same address; a just-closed port can take a moment to free up. */
async function restartServer(addr) {
  let lastError;
  for (let i = 0; i < 20; i += 1) {
    try {
      return await startServer(addr);
    } catch (err) {
      lastError = err;
      await sleep(250);
    }
  }
  throw lastError;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** An HS256 JWT signed here: a token the binary would not mint (already expired). */
function signToken(claims, secret = SECRET) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

function mintToken(sub, name) {
  return execFileSync(BIN, ["token", "--secret", SECRET, "--sub", sub, "--name", name], { encoding: "utf8" }).trim();
}

/** POST /api/publish; returns { ok, status, seq?, error? } and never throws. */
async function publish(addr, text) {
  try {
    const res = await fetch(`http://${addr}/api/publish`, {
      method: "POST",
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({ room: "lobby", content: { text } }),
      signal: AbortSignal.timeout(5000),
    });
    const body = await res.text();
    if (res.status !== 200) return { ok: false, status: res.status, error: body };
    return { ok: true, status: 200, seq: JSON.parse(body).seq };
  } catch (err) {
    return { ok: false, status: 0, error: err.cause?.code || err.message };
  }
}

// ---------------------------------------------------------------------------------

async function openUser(chromium, name, url) {
  const userDataDir = fs.mkdtempSync(path.join(tmp, `chromium-${name}-`));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1280, height: 800 },
    locale: "en-US",
    timezoneId: "UTC",
  });
  browsers.push(context);
  context.setDefaultTimeout(WAIT_MS);
  const page = context.pages()[0] ?? (await context.newPage());
  watchPage(page, name);
  await page.goto(url);
  return page;
}

/** Collect the page's errors in page.errors. Chromium logs every refused WebSocket
 * attempt, and every GET /token/check the client then sends to ask why that finds
 * nobody listening; those are expected while the server is down. With `refusals`, so
 * are its logs of the 401 from /token/check and the 404 from /demo/token (not in demo
 * mode) that a refused token leads to. Anything else on the console's error level fails. */
function watchPage(page, label, { refusals = false } = {}) {
  page.label = label;
  page.errors = [];
  page.on("pageerror", (err) => page.errors.push(String(err)));
  page.on("console", (msg) => {
    const text = msg.text();
    if (msg.type() !== "error" || /^WebSocket connection to .* failed/.test(text)) return;
    if (/^Failed to load resource: net::ERR_CONNECTION_REFUSED$/.test(text)) return;
    if (refusals && /^Failed to load resource: the server responded with a status of 40[14]/.test(text)) return;
    page.errors.push(`console: ${text}`);
  });
  return page;
}

/** The sign-in card after a refused token: the reason, and which form it offers. */
async function refusedLogin(page) {
  await byTestId(page, "login-refused").waitFor();
  return {
    reason: (await byTestId(page, "login-refused").textContent()).trim(),
    nameForm: await byTestId(page, "name-input").isVisible(),
    tokenForm: await byTestId(page, "token-input").isVisible(),
    chatHidden: await page.locator("#app").isHidden(),
    url: page.url(),
  };
}

const byTestId = (page, id) => page.locator(`[data-testid="${id}"]`);
const lobbyMessages = (page) => page.locator('[data-testid="message-list"][data-room="lobby"] [data-testid="message"]');

async function waitState(page, state, timeout = WAIT_MS) {
  await page.locator(`[data-testid="connection-state"][data-state="${state}"]`).waitFor({ timeout });
}

/** The lobby message with this text; waits for it and returns { seq, author }. */
async function waitMessage(page, text, timeout = WAIT_MS) {
  const item = lobbyMessages(page).filter({
    has: page.locator('[data-testid="message-text"]', { hasText: new RegExp(`^${escapeRe(text)}$`) }),
  });
  await item.first().waitFor({ timeout });
  const count = await item.count();
  check(count === 1, `${page.label}: "${text}" is shown ${count} times`);
  return {
    seq: Number(await item.getAttribute("data-seq")),
    author: (await item.locator('[data-testid="message-author"]').textContent()).trim(),
  };
}

function escapeRe(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

async function sendMessage(page, text) {
  await byTestId(page, "message-input").fill(text);
  await byTestId(page, "send-button").click();
}

async function joinLobby(page) {
  await byTestId(page, "room-input").fill("lobby");
  await byTestId(page, "join-button").click();
  await page.locator('[data-testid="room-item"][data-room="lobby"][data-active="true"]').waitFor();
  await page.locator('[data-testid="message-list"][data-room="lobby"]').waitFor({ state: "attached" });
}

/** Wait until the typing indicator's text matches `re` (or is empty when re is null). */
async function waitTyping(page, re, timeout = WAIT_MS) {
  await page.waitForFunction(
    ([source]) => {
      const text = document.querySelector('[data-testid="typing-indicator"]')?.textContent ?? "";
      return source === null ? text.trim() === "" : new RegExp(source).test(text);
    },
    [re ? re.source : null],
    { timeout },
  );
}

/** Wait until the presence list shows exactly these users, each with `connections`. */
async function waitPresence(page, ids, connections = 1) {
  await page.waitForFunction(
    ([want, conns]) => {
      const entries = [...document.querySelectorAll('[data-testid="presence-entry"]')];
      const got = entries.map((e) => e.dataset.userId).sort();
      return (
        JSON.stringify(got) === JSON.stringify([...want].sort()) &&
        entries.every((e) => e.dataset.connections === String(conns))
      );
    },
    [ids, connections],
  );
}

/** Seqs of the lobby messages, in DOM order, with texts. */
async function lobbySeqs(page) {
  return lobbyMessages(page).evaluateAll((items) =>
    items.map((li) => ({ seq: Number(li.dataset.seq), text: li.querySelector('[data-testid="message-text"]')?.textContent ?? "" })),
  );
}

// ---------------------------------------------------------------------------------

const results = [];
async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
    results.push({ name, ok: true });
    log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (err) {
    results.push({ name, ok: false });
    log(`FAIL ${name}: ${err instanceof TestFailure ? err.message : err.stack || err}`);
    throw err;
  }
}

async function main() {
  check(fs.existsSync(BIN), `roomcast binary not found at ${BIN}: run \`cargo build\` first, or pass its path (argv or ROOMCAST_BIN)`);
  check(
    fs.existsSync(CHROMIUM),
    `Chromium not found at ${CHROMIUM}: install it with \`apt-get update && apt-get install -y chromium chromium-driver\``,
  );
  let chromium;
  try {
    ({ chromium } = await import("playwright-core"));
  } catch {
    throw new TestFailure(`playwright-core is not installed: run \`npm ci\` in ${HERE}`);
  }
  fs.mkdirSync(SHOTS, { recursive: true });

  const { addr } = await startServer("127.0.0.1:0");
  const aliceToken = mintToken("alice", "Alice");
  const bobToken = mintToken("bob", "Bob");

  // Every message the server accepted for lobby: seq -> text. Client messages are
  // added once the sender sees its own message (with its seq) come back.
  const accepted = new Map();

  let alice;
  let bob;
  await step("both pages load and connect", async () => {
    [alice, bob] = await Promise.all([
      openUser(chromium, "alice", `http://${addr}/?token=${encodeURIComponent(aliceToken)}`),
      openUser(chromium, "bob", `http://${addr}/?token=${encodeURIComponent(bobToken)}`),
    ]);
    await Promise.all([waitState(alice, "open"), waitState(bob, "open")]);
    check((await byTestId(alice, "current-user").textContent()).includes("Alice"), "alice's header does not name Alice");
  });

  await step("both join lobby and see each other in presence", async () => {
    await joinLobby(alice);
    await joinLobby(bob);
    await waitPresence(alice, ["alice", "bob"], 1);
    await waitPresence(bob, ["alice", "bob"], 1);
  });

  await step("alice sends, bob sees it with her name; bob replies, alice sees it", async () => {
    await sendMessage(alice, "Hi Bob, lunch at noon?");
    const onBob = await waitMessage(bob, "Hi Bob, lunch at noon?");
    check(onBob.author === "Alice", `bob sees the author as ${JSON.stringify(onBob.author)}, not "Alice"`);
    const onAlice = await waitMessage(alice, "Hi Bob, lunch at noon?");
    check(onAlice.seq === onBob.seq, `seq differs between pages: ${onAlice.seq} vs ${onBob.seq}`);
    accepted.set(onBob.seq, "Hi Bob, lunch at noon?");

    await sendMessage(bob, "Sounds good, see you there");
    const reply = await waitMessage(alice, "Sounds good, see you there");
    check(reply.author === "Bob", `alice sees the author as ${JSON.stringify(reply.author)}, not "Bob"`);
    check(reply.seq === onBob.seq + 1, `bob's reply has seq ${reply.seq}, expected ${onBob.seq + 1}`);
    accepted.set(reply.seq, "Sounds good, see you there");
  });

  await step("typing indicator: shown, then cleared by the server's typing timeout", async () => {
    await byTestId(alice, "message-input").pressSequentially("I'll bring", { delay: 15 });
    await waitTyping(bob, /Alice is typing/);
    const shown = Date.now();
    await waitTyping(bob, null, TYPING_TIMEOUT_MS + WAIT_MS);
    log(`     typing cleared ${Date.now() - shown} ms after it showed`);
    check((await byTestId(alice, "typing-indicator").textContent()).trim() === "", "alice sees her own typing");
  });

  await step("typing indicator: shown, then cleared when alice sends", async () => {
    await byTestId(alice, "message-input").pressSequentially(" the snacks", { delay: 15 });
    await waitTyping(bob, /Alice is typing/);
    await byTestId(alice, "send-button").click();
    const sent = await waitMessage(bob, "I'll bring the snacks");
    accepted.set(sent.seq, "I'll bring the snacks");
    await waitTyping(bob, null);
  });

  await step("direct message from bob to alice through the presence list", async () => {
    await bob.locator('[data-testid="presence-entry"][data-user-id="alice"] button').click();
    await bob.locator('[data-testid="dm-item"][data-user-id="alice"][data-active="true"]').waitFor();
    await sendMessage(bob, "psst: it's Carol's birthday");
    await bob.locator('[data-testid="direct-message"]', { hasText: "psst" }).waitFor();
    await alice.locator('[data-testid="dm-item"][data-user-id="bob"]').click();
    const dm = alice.locator('[data-testid="direct-list"][data-peer="bob"] [data-testid="direct-message"]', { hasText: "psst" });
    await dm.waitFor();
    check((await dm.locator('[data-testid="message-author"]').textContent()).includes("Bob"), "the direct message does not name Bob");
    // Back to the lobby on both pages.
    await alice.locator('[data-testid="room-item"][data-room="lobby"] button').click();
    await bob.locator('[data-testid="room-item"][data-room="lobby"] button').click();
  });

  const published = []; // { text, ok, status, seq, error, phase }
  const publishAs = async (text, phase) => {
    const r = await publish(server.addr, text);
    published.push({ text, phase, ...r });
    if (r.ok) accepted.set(r.seq, text);
    return r;
  };
  let n = 0;

  await step("a backend publishes 5 messages through /api/publish", async () => {
    for (let i = 0; i < 5; i += 1) {
      const r = await publishAs(`backend ${++n}`, "before");
      check(r.ok, `publish "backend ${n}" failed before the restart: ${r.status} ${r.error}`);
    }
    await waitMessage(bob, `backend ${n}`);
    await waitMessage(alice, `backend ${n}`);
  });

  await step("SIGTERM: server saves state and exits 0; publishes while it is down are refused", async () => {
    const { child, exited } = server;
    child.kill("SIGTERM");
    // Keep publishing while it drains and after it is gone; only 200s count.
    let finished = null;
    exited.then((r) => (finished = r));
    while (finished === null) {
      await publishAs(`backend ${++n}`, "draining");
      await Promise.race([exited, sleep(200)]);
    }
    for (let i = 0; i < 3; i += 1) await publishAs(`backend ${++n}`, "down");
    check(finished.code === 0, `roomcast exited with ${JSON.stringify(finished)} after SIGTERM, expected code 0`);
    check(fs.existsSync(stateFile), `no state file at ${stateFile} after SIGTERM`);
    const down = published.filter((p) => p.phase === "down");
    check(down.every((p) => !p.ok), "a publish succeeded while the server was down");
    log(`     ${published.filter((p) => p.phase !== "before" && !p.ok).length} publishes refused while down/draining, ` +
        `${published.filter((p) => p.phase === "draining" && p.ok).length} accepted during the drain`);
    // Both pages notice and start reconnecting by themselves.
    await Promise.all([waitState(alice, "reconnecting"), waitState(bob, "reconnecting")]);
  });

  await step("restart on the same port with the same state file; the backend publishes 5 more", async () => {
    const old = server.addr;
    await restartServer(old);
    check(server.addr === old, `restarted on ${server.addr}, not ${old}`);
    for (let i = 0; i < 5; i += 1) {
      const r = await publishAs(`backend ${++n}`, "after");
      check(r.ok, `publish "backend ${n}" failed after the restart: ${r.status} ${r.error}`);
    }
  });

  await step("both pages reconnect by themselves and recover (notice, presence)", async () => {
    await Promise.all([waitState(alice, "open", RECOVERY_WAIT_MS), waitState(bob, "open", RECOVERY_WAIT_MS)]);
    for (const page of [alice, bob]) {
      const notice = page.locator('[data-testid="notice"][data-room="lobby"][data-kind="recovered"]').first();
      await notice.waitFor({ timeout: RECOVERY_WAIT_MS });
      log(`     ${page.label}: "${(await notice.textContent()).trim()}"`);
      check((await page.locator('[data-testid="notice"][data-kind="gap"]').count()) === 0, `${page.label} shows a gap notice`);
    }
    await waitPresence(alice, ["alice", "bob"], 1);
    await waitPresence(bob, ["alice", "bob"], 1);
  });

  await step("chat still works after the restart", async () => {
    await sendMessage(alice, "Back online!");
    const seen = await waitMessage(bob, "Back online!");
    accepted.set(seen.seq, "Back online!");
    await waitMessage(alice, "Back online!");
  });

  await step("every accepted message is on each page exactly once, in seq order", async () => {
    const expected = [...accepted.keys()].sort((a, b) => a - b);
    log(`     accepted seqs: ${expected.join(",")} (publish attempts: ${published.length}, accepted: ${published.filter((p) => p.ok).length})`);
    for (const page of [alice, bob]) {
      await page.waitForFunction(
        (want) => {
          const have = new Set(
            [...document.querySelectorAll('[data-testid="message-list"][data-room="lobby"] [data-testid="message"]')].map(
              (li) => Number(li.dataset.seq),
            ),
          );
          return want.every((s) => have.has(s));
        },
        expected,
        { timeout: RECOVERY_WAIT_MS },
      );
      const shown = await lobbySeqs(page);
      const seqs = shown.map((m) => m.seq);
      check(
        JSON.stringify(seqs) === JSON.stringify(expected),
        `${page.label}: lobby shows seqs [${seqs.join(",")}], expected exactly [${expected.join(",")}]`,
      );
      for (const m of shown) {
        check(m.text === accepted.get(m.seq), `${page.label}: seq ${m.seq} shows ${JSON.stringify(m.text)}, expected ${JSON.stringify(accepted.get(m.seq))}`);
      }
    }
    // The numbering has no holes: what was accepted is all there was (1..N).
    check(expected[0] === 1 && expected.at(-1) === expected.length, `accepted seqs are not 1..${expected.length}: ${expected.join(",")}`);
  });

  await step("no page errors; screenshots saved (alice typing, bob watching)", async () => {
    for (const page of [alice, bob]) {
      check(page.errors.length === 0, `${page.label} had page errors:\n  ${page.errors.join("\n  ")}`);
    }
    await byTestId(alice, "message-input").pressSequentially("See you at noon", { delay: 10 });
    await waitTyping(bob, /Alice is typing/);
    for (const page of [alice, bob]) {
      const file = path.join(SHOTS, `${page.label}.png`);
      await page.screenshot({ path: file });
      log(`     screenshot ${path.relative(REPO, file)}`);
    }
  });

  await step("a refused token (garbage, expired): the page says why and offers the token form", async () => {
    const page = watchPage(await alice.context().newPage(), "bad-token", { refusals: true });
    const expired = signToken({ sub: "erin", name: "Erin", exp: Math.floor(Date.now() / 1000) - 120 });
    const cases = [
      ["garbage", "this-is-not-a-jwt", "Your token was refused: it is not a well-formed token."],
      ["expired", expired, "Your token was refused: it has expired."],
    ];
    for (const [what, token, reason] of cases) {
      await page.goto(`http://${server.addr}/?token=${encodeURIComponent(token)}`);
      const seen = await refusedLogin(page);
      log(`     ${what}: "${seen.reason}"`);
      check(seen.reason === reason, `${what} token: the page says ${JSON.stringify(seen.reason)}, expected ${JSON.stringify(reason)}`);
      check(seen.tokenForm && !seen.nameForm, `${what} token: the token form is not offered alone (not a demo server)`);
      check(seen.chatHidden, `${what} token: the chat is still shown`);
      check(!seen.url.includes("token="), `${what} token: the refused token is still in the URL: ${seen.url}`);
    }
    const file = path.join(SHOTS, "bad-token.png");
    await page.screenshot({ path: file });
    log(`     screenshot ${path.relative(REPO, file)}`);
    // The form it offers works: a good token opens the chat.
    await byTestId(page, "token-input").fill(mintToken("erin", "Erin"));
    await byTestId(page, "login-button").click();
    await waitState(page, "open");
    check((await byTestId(page, "current-user").textContent()).includes("Erin"), "the pasted token does not sign in Erin");
    check(await byTestId(page, "login-refused").isHidden(), "the refusal is still shown after signing in");
    check(page.errors.length === 0, `bad-token page errors:\n  ${page.errors.join("\n  ")}`);
    await page.close();
  });

  await step("demo mode: pick a name, get a guest token from /demo/token, chat", async () => {
    const demo = await startServer("127.0.0.1:0", ["--listen", "127.0.0.1:0"]);
    const page = watchPage(await alice.context().newPage(), "demo", { refusals: true });
    // Without a token the page asks for a guest name.
    await page.goto(`http://${demo.addr}/`);
    await byTestId(page, "name-input").waitFor();
    check(await byTestId(page, "login-refused").isHidden(), "a fresh demo page shows a refusal");
    // A refused token brings the guest-name form back, with the reason.
    await page.goto(`http://${demo.addr}/?token=garbage`);
    const seen = await refusedLogin(page);
    check(seen.reason === "Your token was refused: it is not a well-formed token.", `demo page says ${JSON.stringify(seen.reason)}`);
    check(seen.nameForm, "the demo page does not offer the guest-name form after a refused token");
    const file = path.join(SHOTS, "bad-token-demo.png");
    await page.screenshot({ path: file });
    log(`     screenshot ${path.relative(REPO, file)}`);
    await byTestId(page, "name-input").fill("Carol");
    await byTestId(page, "login-button").click();
    await waitState(page, "open");
    check((await byTestId(page, "current-user").textContent()).includes("Carol"), "the demo page does not show Carol as the user");
    await joinLobby(page);
    await sendMessage(page, "hello from a guest");
    const sent = await waitMessage(page, "hello from a guest");
    check(sent.author === "Carol (you)", `the guest's message is signed ${JSON.stringify(sent.author)}`);
    check(sent.seq === 1, `the first message of a fresh demo server has seq ${sent.seq}`);
    check(page.errors.length === 0, `demo page errors:\n  ${page.errors.join("\n  ")}`);
    await page.close();
    demo.child.kill("SIGTERM");
    const { code } = await demo.exited;
    check(code === 0, `the demo server exited with ${code}`);
    check(alice.errors.length === 0, alice.errors.join("\n"));
  });
}

async function cleanup() {
  for (const context of browsers) {
    await context.close().catch(() => {});
  }
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(child.pid, "SIGKILL");
      } catch {
        /* already gone */
      }
    }
  }
  fs.rmSync(tmp, { recursive: true, force: true });
}

let failed = false;
const watchdog = setTimeout(() => {
  log("FAIL the whole test took longer than 5 minutes");
  cleanup().finally(() => process.exit(1));
}, 5 * 60 * 1000);
try {
  await main();
} catch (err) {
  failed = true;
  if (!results.some((r) => !r.ok)) log(`FAIL ${err instanceof TestFailure ? err.message : err.stack || err}`);
  // Leave evidence: screenshots of whatever pages exist, and the server's last log lines.
  try {
    fs.mkdirSync(SHOTS, { recursive: true });
    for (const context of browsers) {
      for (const page of context.pages()) {
        const file = path.join(SHOTS, `failure-${page.label ?? "page"}.png`);
        await page.screenshot({ path: file }).catch(() => {});
        log(`     failure screenshot ${path.relative(REPO, file)}`);
      }
    }
  } catch {
    /* best effort */
  }
  if (server) log(`roomcast stderr (last lines):\n${server.stderr.slice(-40).join("\n")}`);
} finally {
  await cleanup();
  clearTimeout(watchdog);
}
const passed = results.filter((r) => r.ok).length;
console.log(`browser: ${passed} passed, ${failed ? 1 : 0} failed`);
process.exit(failed ? 1 : 0);
