"""Tests of backend.py alone, over real loopback HTTP: `python3 -m unittest` in this folder.

The backend runs as a child process on a free port (it prints the port it bound);
a stub stands in for roomcast's POST /api/publish.
"""

import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import threading
import unittest
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND = os.path.join(HERE, "backend.py")
API_KEY = "test-api-key"
SECRET = "test-webhook-secret"


class StubRoomcast(BaseHTTPRequestHandler):
    """Records each POST /api/publish and answers like roomcast."""

    requests = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        StubRoomcast.requests.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        answer = b'{"delivered":1,"seq":7}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def http(method, url, body=None, headers=None):
    """(status, headers, parsed JSON body) of one request."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read() or b"null")


def signed(body, secret=SECRET):
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def message(room, seq, text, time_ms=None, user="alice"):
    return {"name": "message", "room": room, "time_ms": time_ms or 1_700_000_000_000 + seq,
            "seq": seq, "user": {"id": user, "name": user.title()}, "content": {"text": text}}


class BackendTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stub = ThreadingHTTPServer(("127.0.0.1", 0), StubRoomcast)
        threading.Thread(target=cls.stub.serve_forever, daemon=True).start()
        cls.roomcast = "http://127.0.0.1:%d" % cls.stub.server_address[1]
        cls.tmp = tempfile.TemporaryDirectory()
        cls.proc = subprocess.Popen(
            [sys.executable, BACKEND, "--listen", "127.0.0.1:0", "--secret", SECRET,
             "--api-key", API_KEY, "--roomcast", cls.roomcast,
             "--db", os.path.join(cls.tmp.name, "test.sqlite3")],
            stdout=subprocess.PIPE, text=True,
        )
        line = cls.proc.stdout.readline()  # "backend listening on http://127.0.0.1:PORT"
        assert "listening on http://" in line, line
        cls.base = line.strip().rsplit(" ", 1)[1]

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(10)
        cls.proc.stdout.close()
        cls.stub.shutdown()
        cls.stub.server_close()
        cls.tmp.cleanup()

    def deliver(self, events, delivery, signature=None):
        body = json.dumps({"events": events}).encode()
        headers = {"Content-Type": "application/json", "X-Roomcast-Delivery": delivery,
                   "X-Roomcast-Signature": signature or signed(body)}
        return http("POST", self.base + "/webhook", body, headers)

    def messages(self, room, query=""):
        status, headers, answer = http("GET", "%s/rooms/%s/messages%s" % (self.base, room, query))
        self.assertEqual(status, 200, answer)
        self.assertEqual(headers["Access-Control-Allow-Origin"], "*")
        return answer["messages"]

    def test_signature_is_checked(self):
        room = "chat:signed"
        body = json.dumps({"events": [message(room, 1, "x")]}).encode()
        for signature in ["sha256=" + "0" * 64, signed(body, "another-secret"), "", "sha256="]:
            status, _, _ = http("POST", self.base + "/webhook", body,
                                {"X-Roomcast-Delivery": "d-bad", "X-Roomcast-Signature": signature})
            self.assertEqual(status, 401, signature)
        status, _, _ = http("POST", self.base + "/webhook", body, {"X-Roomcast-Delivery": "d-bad"})
        self.assertEqual(status, 401)
        self.assertEqual(self.messages(room), [])
        # The body is signed byte for byte: the same JSON re-serialised is another body.
        status, _, _ = self.deliver([message(room, 1, "x")], "d-bad", signed(body + b" "))
        self.assertEqual(status, 401)
        status, _, answer = self.deliver([message(room, 1, "x")], "d-good")
        self.assertEqual((status, answer), (200, {"applied": True}))
        self.assertEqual([m["content"] for m in self.messages(room)], [{"text": "x"}])

    def test_redelivery_is_applied_once(self):
        room = "chat:retry"
        batch = [{"name": "room_occupied", "room": room, "time_ms": 1},
                 {"name": "member_added", "room": room, "time_ms": 1,
                  "user": {"id": "alice", "name": "Alice"}},
                 message(room, 1, "one"), message(room, 2, "two")]
        self.assertEqual(self.deliver(batch, "d-retry")[2], {"applied": True})
        self.assertEqual(self.deliver(batch, "d-retry")[2], {"applied": False})
        # The same events in another batch (which roomcast does not do) add nothing either.
        self.assertEqual(self.deliver(batch[2:], "d-retry-2")[2], {"applied": True})
        got = self.messages(room)
        self.assertEqual([(m["seq"], m["content"]["text"]) for m in got], [(1, "one"), (2, "two")])
        self.assertEqual(got[0]["user"], {"id": "alice", "name": "Alice"})

    def test_bad_batches(self):
        body = b"not json"
        status, _, _ = http("POST", self.base + "/webhook", body,
                            {"X-Roomcast-Delivery": "d-junk", "X-Roomcast-Signature": signed(body)})
        self.assertEqual(status, 400)
        status, _, _ = self.deliver([{"name": "message", "room": "chat:x"}], "d-fieldless")
        self.assertEqual(status, 400)
        # Nothing of a refused batch was kept, so its retry is applied when it can be.
        status, _, _ = self.deliver([message("chat:x", 1, "ok")], "d-fieldless")
        self.assertEqual(status, 200)
        # Unknown event names are skipped, not refused (a newer roomcast may send more).
        status, _, answer = self.deliver([{"name": "room_renamed", "room": "chat:x", "time_ms": 1}],
                                         "d-unknown")
        self.assertEqual((status, answer), (200, {"applied": True}))

    def test_paging_oldest_first(self):
        room = "chat:paging"
        self.deliver([message(room, seq, "m%d" % seq) for seq in range(1, 11)], "d-paging")
        seqs = lambda page: [m["seq"] for m in page]
        self.assertEqual(seqs(self.messages(room, "?limit=3")), [8, 9, 10])
        page = self.messages(room, "?before=8&limit=3")
        self.assertEqual(seqs(page), [5, 6, 7])
        self.assertEqual(seqs(self.messages(room, "?before_id=%d&limit=3" % page[0]["id"])), [2, 3, 4])
        self.assertEqual(seqs(self.messages(room, "?before=3&limit=50")), [1, 2])
        self.assertEqual(self.messages(room, "?before=1"), [])
        self.assertEqual(self.messages("chat:nobody"), [])
        status, _, _ = http("GET", self.base + "/rooms/%s/messages?before=x" % room)
        self.assertEqual(status, 400)

    def test_a_new_epoch_keeps_the_old_messages(self):
        room = "chat:epochs"
        old = [message(room, seq, "old %d" % seq, time_ms=1_000 + seq) for seq in (1, 2, 3)]
        new = [message(room, seq, "new %d" % seq, time_ms=900_000 + seq) for seq in (1, 2)]
        self.deliver(old, "d-epoch-1")
        self.deliver(new, "d-epoch-2")
        texts = lambda page: [m["content"]["text"] for m in page]
        self.assertEqual(texts(self.messages(room)), ["old 1", "old 2", "old 3", "new 1", "new 2"])
        # The page holds the new epoch from seq 1: older is the old epoch.
        self.assertEqual(texts(self.messages(room, "?before=1")), ["old 1", "old 2", "old 3"])
        self.assertEqual(texts(self.messages(room, "?before=2&limit=2")), ["old 3", "new 1"])

    def test_feed_forwards_to_publish(self):
        StubRoomcast.requests.clear()
        url = self.base + "/feed/feed:news"
        status, _, _ = http("POST", url, b'{"text":"hi"}')
        self.assertEqual(status, 401)
        status, _, answer = http("POST", url, b'{"text":"hi"}', {"Authorization": "Bearer " + API_KEY})
        self.assertEqual((status, answer), (200, {"delivered": 1, "seq": 7}))
        self.assertEqual(StubRoomcast.requests, [
            ("/api/publish", "Bearer " + API_KEY, {"room": "feed:news", "content": {"text": "hi"}})])

    def test_publish_command(self):
        StubRoomcast.requests.clear()
        out = subprocess.run(
            [sys.executable, BACKEND, "publish", "feed:news", "breaking",
             "--roomcast", self.roomcast, "--api-key", API_KEY],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout), {"delivered": 1, "seq": 7})
        self.assertEqual(StubRoomcast.requests, [
            ("/api/publish", "Bearer " + API_KEY,
             {"room": "feed:news", "content": {"text": "breaking"}})])


if __name__ == "__main__":
    unittest.main()
