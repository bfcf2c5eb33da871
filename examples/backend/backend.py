#!/usr/bin/env python3
"""An example application backend for roomcast (PROTOCOL §14), standard library only.

It does three things:

  POST /webhook                         roomcast's webhooks (§14.2): checks the signature,
                                        drops batches it already applied, keeps every chat
                                        `message` and a log of presence events in SQLite
  GET  /rooms/{room}/messages           "load older messages" for the page, from that store
  POST /feed/{room}                     the app's services post to a read-only feed; forwarded
                                        to roomcast's POST /api/publish with the API key

and one command:

  python3 backend.py publish ROOM TEXT  the same publish, from a shell

Run `python3 backend.py --help`; docs/backend.md walks through it.
"""

import argparse
import hashlib
import hmac
import json
import os
import sqlite3
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCHEMA = """
-- One row per webhook batch applied: roomcast sends the same X-Roomcast-Delivery on
-- every retry of a batch, so a batch found here was applied already.
CREATE TABLE IF NOT EXISTS deliveries (
    id          TEXT PRIMARY KEY,
    received_ms INTEGER NOT NULL
);

-- Chat messages, in the order the webhooks brought them (`id`, which is the room's seq
-- order: roomcast sends events in order).
--
-- The key. A room's seq restarts at 1 when the room starts a new epoch (a room forgotten
-- 5 minutes after its last member left, a restart without --state-file: PROTOCOL §11),
-- and the webhook does not carry the epoch. So (room, seq) alone would merge a new life's
-- seq 1 with the old life's seq 1 and silently drop the new message. (room, seq, time_ms)
-- is the same on every retry of an event (roomcast stamps it once) and differs between
-- two lives of a room (a new life's seq N comes after the old life's seq N, after at
-- least a restart or five empty minutes, never in the same millisecond). The delivery
-- table above already makes a retried batch a no-op; this key is the second line, and
-- what makes INSERT OR IGNORE safe.
CREATE TABLE IF NOT EXISTS messages (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    room      TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    time_ms   INTEGER NOT NULL,
    user_id   TEXT NOT NULL,
    user_name TEXT NOT NULL,
    content   TEXT NOT NULL,          -- the message's content, as JSON text
    UNIQUE (room, seq, time_ms)
);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id);

-- Who came and went: room_occupied, room_vacated, member_added, member_removed.
CREATE TABLE IF NOT EXISTS presence_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    room    TEXT NOT NULL,
    name    TEXT NOT NULL,
    user_id TEXT,                     -- NULL for room_occupied / room_vacated
    time_ms INTEGER NOT NULL
);
"""

MAX_PAGE = 200


def open_db(path):
    db = sqlite3.connect(path, timeout=10, isolation_level=None)  # we BEGIN ourselves
    db.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the webhook writer
    db.executescript(SCHEMA)
    return db


# --- webhooks ------------------------------------------------------------------------


def signature_ok(secret, body, header):
    """X-Roomcast-Signature is `sha256=` + hex HMAC-SHA256 of the exact body."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    given = (header or "").strip().lower()  # hex digits in either case
    return hmac.compare_digest(expected.encode(), given.encode())  # constant time


def apply_batch(db, delivery, events, received_ms):
    """Applies one batch in one transaction. Returns False if it was applied before."""
    db.execute("BEGIN IMMEDIATE")
    try:
        cur = db.execute(
            "INSERT OR IGNORE INTO deliveries (id, received_ms) VALUES (?, ?)",
            (delivery, received_ms),
        )
        if cur.rowcount == 0:  # a retry of a batch we answered 2xx to, or whose answer got lost
            db.execute("ROLLBACK")
            return False
        for event in events:
            name, room = event["name"], event["room"]
            if name == "message":
                user = event["user"]
                db.execute(
                    "INSERT OR IGNORE INTO messages (room, seq, time_ms, user_id, user_name, content)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (room, event["seq"], event["time_ms"], user["id"], user["name"],
                     json.dumps(event["content"], separators=(",", ":"))),
                )
            elif name in ("member_added", "member_removed", "room_occupied", "room_vacated"):
                user = event.get("user") or {}
                db.execute(
                    "INSERT INTO presence_log (room, name, user_id, time_ms) VALUES (?, ?, ?, ?)",
                    (room, name, user.get("id"), event["time_ms"]),
                )
            # Event names added by later versions of roomcast are ignored, not refused:
            # refusing would make roomcast retry this batch forever.
        db.execute("COMMIT")
        return True
    except BaseException:
        db.execute("ROLLBACK")
        raise


# --- "load older messages" -----------------------------------------------------------


def older_messages(db, room, before=None, before_id=None, limit=50):
    """Up to `limit` messages of `room` older than a point, oldest first.

    before=SEQ is the seq of the oldest message the page got from roomcast: the answer
    is what came before the newest stored message with that seq (the room's current
    epoch, as epochs arrive in order), or, when that seq is not stored (a message
    published with /api/publish, which webhooks do not report), up to the newest
    stored message with a smaller seq. before_id=ID is the `id` of the oldest message
    a previous page returned: exact even across epochs, so pages after the first use
    it. Neither: the newest messages.
    """
    if before_id is not None:
        bound = before_id - 1
    elif before is not None:
        (exact,) = db.execute(
            "SELECT MAX(id) FROM messages WHERE room = ? AND seq = ?", (room, before)
        ).fetchone()
        (below,) = db.execute(
            "SELECT MAX(id) FROM messages WHERE room = ? AND seq < ?", (room, before)
        ).fetchone()
        bound = exact - 1 if exact is not None else (below or 0)
    else:
        bound = None
    rows = db.execute(
        "SELECT id, seq, time_ms, user_id, user_name, content FROM messages"
        " WHERE room = ? AND (? IS NULL OR id <= ?) ORDER BY id DESC LIMIT ?",
        (room, bound, bound, limit),
    ).fetchall()
    return [
        {"id": id_, "seq": seq, "time_ms": time_ms,
         "user": {"id": user_id, "name": user_name}, "content": json.loads(content)}
        for id_, seq, time_ms, user_id, user_name, content in reversed(rows)
    ]


# --- publishing to roomcast ----------------------------------------------------------


def publish(roomcast, api_key, room, content):
    """POST /api/publish; returns (status, answer as text). Raises OSError if unreachable."""
    request = urllib.request.Request(
        roomcast.rstrip("/") + "/api/publish",
        data=json.dumps({"room": room, "content": content}).encode(),
        headers={"Authorization": "Bearer " + api_key, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:  # 4xx / 5xx: roomcast answered
        return error.code, error.read().decode()


# --- HTTP ------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "roomcast-example-backend"
    protocol_version = "HTTP/1.1"  # keep-alive for roomcast's webhook client; every answer has a length
    config = None  # set by serve()

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/webhook":
            self.webhook(body)
        elif path.startswith("/feed/"):
            self.feed(urllib.parse.unquote(path[len("/feed/"):]), body)
        else:
            self.answer(404, {"error": "not_found"})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")  # "", "rooms", ROOM, "messages"
        if len(parts) == 4 and parts[1] == "rooms" and parts[3] == "messages":
            self.messages(urllib.parse.unquote(parts[2]), urllib.parse.parse_qs(url.query))
        elif url.path == "/health":
            self.answer(200, {"status": "ok"})
        else:
            self.answer(404, {"error": "not_found"})

    def webhook(self, body):
        if not signature_ok(self.config.secret, body, self.headers.get("X-Roomcast-Signature")):
            return self.answer(401, {"error": "bad_signature"})
        delivery = self.headers.get("X-Roomcast-Delivery")
        try:
            events = json.loads(body)["events"]
        except (ValueError, KeyError, TypeError):
            events = None
        if not delivery or not isinstance(events, list):
            # Signed but unreadable: answer 400 and log it. roomcast will retry it (only
            # 2xx delivers), so this shows up in its roomcast_webhook_failures_total.
            self.log_message("unreadable webhook batch %r", delivery)
            return self.answer(400, {"error": "bad_batch"})
        db = open_db(self.config.db)
        try:
            applied = apply_batch(db, delivery, events, now_ms())
        except (KeyError, TypeError, AttributeError):  # an event without its fields
            self.log_message("malformed event in webhook batch %r", delivery)
            return self.answer(400, {"error": "bad_batch"})
        finally:
            db.close()
        # "applied": false is a batch seen before; 2xx all the same, so roomcast stops retrying.
        self.answer(200, {"applied": applied})

    def messages(self, room, query):
        try:
            before = int(query["before"][0]) if "before" in query else None
            before_id = int(query["before_id"][0]) if "before_id" in query else None
            limit = min(int(query.get("limit", ["50"])[0]), MAX_PAGE)
        except ValueError:
            return self.answer(400, {"error": "bad_query"})
        # A real app checks here that the caller may read `room` (its session, or the
        # roomcast token and its `rooms` claim); this example answers anyone.
        db = open_db(self.config.db)
        try:
            found = older_messages(db, room, before, before_id, max(limit, 0))
        finally:
            db.close()
        self.answer(200, {"room": room, "messages": found})

    def feed(self, room, body):
        # Only the app's own services may post to a feed: they present roomcast's API key.
        if not self.config.api_key:
            return self.answer(503, {"error": "no_api_key"})
        if not hmac.compare_digest((self.headers.get("Authorization") or "").encode(),
                                   ("Bearer " + self.config.api_key).encode()):
            return self.answer(401, {"error": "unauthorized"})
        try:
            content = json.loads(body)
        except ValueError:
            return self.answer(400, {"error": "invalid_json"})
        try:
            status, text = publish(self.config.roomcast, self.config.api_key, room, content)
        except OSError as error:  # roomcast down: say so; the caller decides to retry
            return self.answer(502, {"error": "roomcast_unreachable", "detail": str(error)})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text.encode())))
        self.end_headers()
        self.wfile.write(text.encode())

    def answer(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # The page is served by roomcast, another origin: let it read the answers.
        # Name your page's origin here instead of `*` in a real deployment.
        self.send_header("Access-Control-Allow-Origin", self.config.allow_origin)
        self.end_headers()
        self.wfile.write(data)


def now_ms():
    return int(time.time() * 1000)


def serve(config):
    open_db(config.db).close()  # create the tables before the first request
    host, _, port = config.listen.rpartition(":")
    Handler.config = config
    server = ThreadingHTTPServer((host, int(port)), Handler)
    address = "%s:%d" % server.server_address[:2]
    # The readiness line: the address actually bound (with port 0, the one the OS chose).
    print("backend listening on http://" + address, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def main(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Example application backend for roomcast.")
    parser.add_argument("--listen", default=env("BACKEND_LISTEN", "127.0.0.1:9000"),
                        help="address to serve on (port 0: any free port) [BACKEND_LISTEN]")
    parser.add_argument("--api-key", default=env("ROOMCAST_API_KEY"),
                        help="roomcast's --api-key, for /api/publish [ROOMCAST_API_KEY]")
    parser.add_argument("--secret", default=env("ROOMCAST_WEBHOOK_SECRET"),
                        help="roomcast's --webhook-secret; default: the API key, as in roomcast"
                             " [ROOMCAST_WEBHOOK_SECRET]")
    parser.add_argument("--roomcast", default=env("ROOMCAST_URL", "http://127.0.0.1:8080"),
                        help="roomcast's base URL [ROOMCAST_URL]")
    parser.add_argument("--db", default=env("BACKEND_DB", "backend.sqlite3"),
                        help="SQLite file [BACKEND_DB]")
    parser.add_argument("--allow-origin", default=env("BACKEND_ALLOW_ORIGIN", "*"),
                        help="CORS origin allowed to read messages [BACKEND_ALLOW_ORIGIN]")
    parser.add_argument("command", nargs="*", metavar="publish ROOM TEXT",
                        help="publish {\"text\": TEXT} to ROOM through roomcast and exit")
    config = parser.parse_args(argv)

    config.secret = config.secret or config.api_key
    if config.command:
        if len(config.command) != 3 or config.command[0] != "publish":
            parser.error("the only command is: publish ROOM TEXT")
        if not config.api_key:
            parser.error("publish needs --api-key (or ROOMCAST_API_KEY)")
        _, room, text = config.command
        try:
            status, text = publish(config.roomcast, config.api_key, room, {"text": text})
        except OSError as error:
            sys.exit("roomcast at %s unreachable: %s" % (config.roomcast, error))
        if status != 200:
            sys.exit("roomcast answered %d: %s" % (status, text.strip()))
        print(text)
        return 0
    if not config.secret:
        parser.error("--secret or --api-key is needed to check webhook signatures")
    serve(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
