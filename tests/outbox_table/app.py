#!/usr/bin/env python3
"""The application and the receiver around `converge relay --config` (an application's own
outbox table) in its tests, in Python's standard library on purpose: the application
that writes the table and the service that receives the events are not C++.

  app.py create-sqlite DB
      Creates the outbox table in the SQLite file DB (the README's CREATE TABLE).
  app.py write-sqlite DB AGGREGATES PER_AGGREGATE PREFIX
      Writes PER_AGGREGATE events for each of AGGREGATES aggregates (PREFIX0, PREFIX1...),
      each row in its own transaction, interleaving the aggregates; payload {"n": k}, k
      counting per aggregate from 0.
  app.py pg-sql AGGREGATES PER_AGGREGATE PREFIX
      The same rows as INSERT statements for psql (each one its own transaction).
  app.py receiver PORT_FILE SECRET
      An HTTP target on 127.0.0.1 (free port written to PORT_FILE). POST verifies the
      Standard Webhooks signature with SECRET and records the CloudEvent by id (401 when the
      signature is wrong). GET /stats: {"distinct": n, "posts": n, "bad_signatures": n,
      "violations": [...], "order": {subject: [ids, first-seen order]}}; a violation is an
      event first seen out of its aggregate's order (its "n" is not the previous one + 1).
"""
import base64
import hashlib
import hmac
import json
import os
import sqlite3
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SQLITE_TABLE = """
CREATE TABLE IF NOT EXISTS outbox (
  id            TEXT PRIMARY KEY,
  aggregatetype TEXT NOT NULL,
  aggregateid   TEXT NOT NULL,
  type          TEXT NOT NULL,
  payload       TEXT NOT NULL,
  created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  published_at  TEXT
)"""

lock = threading.Lock()
state = {"seen": {}, "posts": 0, "bad_signatures": 0, "violations": [], "order": {}}


def rows(aggregates, per, prefix):
    for k in range(per):
        for a in range(aggregates):
            yield (str(uuid.uuid4()), "order", "%s%d" % (prefix, a), "order.updated",
                   json.dumps({"n": k}))


def write_sqlite(db, aggregates, per, prefix):
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    for row in rows(aggregates, per, prefix):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
                     "VALUES (?, ?, ?, ?, ?)", row)
        conn.execute("COMMIT")
    conn.close()


def pg_sql(aggregates, per, prefix):
    for r in rows(aggregates, per, prefix):
        print("INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) "
              "VALUES ('%s', '%s', '%s', '%s', '%s');" % r)


def signature(secret, msg_id, ts, body):
    key = base64.b64decode(secret[len("whsec_"):])
    mac = hmac.new(key, ("%s.%s." % (msg_id, ts)).encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    secret = ""

    def log_message(self, *args):
        pass

    def answer(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            return self.answer(200, {"distinct": len(state["seen"]), "posts": state["posts"],
                                     "bad_signatures": state["bad_signatures"],
                                     "violations": state["violations"],
                                     "order": state["order"]})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        msg_id = self.headers.get("webhook-id", "")
        ts = self.headers.get("webhook-timestamp", "")
        given = self.headers.get("webhook-signature", "").split(" ")
        if signature(Receiver.secret, msg_id, ts, body) not in given:
            with lock:
                state["bad_signatures"] += 1
            return self.answer(401, {"error": "bad signature"})
        event = json.loads(body)
        with lock:
            state["posts"] += 1
            if event["id"] not in state["seen"]:  # the receiver's dedupe, by event id
                state["seen"][event["id"]] = True
                subject = event["subject"]
                order = state["order"].setdefault(subject, [])
                n = event.get("data", {}).get("n") if isinstance(event.get("data"), dict) \
                    else None
                if n is not None and n != len(order):
                    state["violations"].append({"subject": subject, "n": n,
                                                "expected": len(order)})
                order.append(event["id"])
        self.answer(200, {"ok": True})


def main():
    cmd = sys.argv[1]
    if cmd == "create-sqlite":
        conn = sqlite3.connect(sys.argv[2], isolation_level=None)
        conn.execute(SQLITE_TABLE)
        conn.close()
    elif cmd == "write-sqlite":
        write_sqlite(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif cmd == "pg-sql":
        pg_sql(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif cmd == "receiver":
        Receiver.secret = sys.argv[3]
        server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        with open(sys.argv[2] + ".tmp", "w") as f:
            f.write("%d\n" % server.server_address[1])
        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
        server.serve_forever()


if __name__ == "__main__":
    main()
