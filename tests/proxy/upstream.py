#!/usr/bin/env python3
"""A stand-in upstream API for the `converge proxy` tests, written in Python on purpose: the
proxy serves services in any language.

  upstream.py PORT_FILE

Listens on 127.0.0.1 (a free port, written to PORT_FILE) and serves:
  POST /v1/charges      creates a charge {"id", "amount"}: 201 (303 with X-See-Other).
                        When the request carries
                        the forwarded key (header Upstream-Key) and `dedupe` is on, a
                        second request with that key gets the first charge back.
  GET  /v1/charges/ID   200 or 404 (HEAD: the same fields, no body)
  POST /v1/big          201 with a body of `big_bytes` bytes
  GET  /stats           {"requests": {key: n}, "charges": n, "heads": n (HEAD requests),
                        "headers": {the last POST's fields}}
  POST /faults          JSON: {"fail_next": n (answer 500), "delay_ms": d (each of the next
                        `delay_next` requests), "dedupe": bool, "big_bytes": n}
Every request without a key is counted under "".
"""
import gzip
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
state = {"requests": {}, "charges": {}, "by_key": {}, "fail_next": 0, "delay_ms": 0,
         "delay_next": 0, "dedupe": True, "big_bytes": 4096, "headers": {}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, extra=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        # Compressed when the client asks (as Python's requests does by default): the
        # proxy must replay the encoding with the bytes.
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        if gzipped:
            data = gzip.compress(data)
        self.send_response(status)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def chunked(self, data):
        # The answer in chunks, without a length (a HEAD gets the same header, no body).
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command != "HEAD":
            for i in range(0, len(data), 4):
                part = data[i:i + 4]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        if self.path == "/v1/chunked":
            return self.chunked(b"in chunks")
        if self.path == "/stats":
            with lock:
                return self.answer(200, {"requests": state["requests"],
                                         "charges": len(state["charges"]),
                                         "heads": state.get("heads", 0),
                                         "headers": state["headers"]})
        if self.path.startswith("/v1/charges/"):
            with lock:
                c = state["charges"].get(self.path.rsplit("/", 1)[1])
            return self.answer(200, c) if c else self.answer(404, {"error": "no such charge"})
        self.answer(404, {"error": "no route"})

    def do_HEAD(self):
        with lock:
            state["heads"] = state.get("heads", 0) + 1
        self.do_GET()

    def do_POST(self):
        raw = self.body()
        if self.path == "/faults":
            with lock:
                state.update(json.loads(raw or b"{}"))
            return self.answer(200, {"ok": True})
        key = self.headers.get("Upstream-Key", "")
        with lock:
            state["requests"][key] = state["requests"].get(key, 0) + 1
            state["headers"] = {k: v for k, v in self.headers.items()}
            fail = state["fail_next"] > 0
            if fail:
                state["fail_next"] -= 1
            delay = state["delay_ms"] if state["delay_next"] > 0 else 0
            if delay:
                state["delay_next"] -= 1
        if delay:
            time.sleep(delay / 1000.0)
        if fail:
            return self.answer(500, {"error": "injected failure"})
        if self.path == "/v1/big":
            return self.answer(201, b"x" * state["big_bytes"])
        if self.path.split("?", 1)[0] != "/v1/charges":
            return self.answer(404, {"error": "no route"})
        try:
            amount = json.loads(raw)["amount"]
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"error": "expected {\"amount\": n}"})
        with lock:
            if key and state["dedupe"] and key in state["by_key"]:
                charge = state["charges"][state["by_key"][key]]
            else:
                cid = "ch_%d" % (len(state["charges"]) + 1)
                charge = {"id": cid, "amount": amount}
                state["charges"][cid] = charge
                if key:
                    state["by_key"][key] = cid
        extra = {"Location": "/v1/charges/" + charge["id"], "X-Upstream-Secret": "not-replayed"}
        if self.headers.get("X-Latin1-Etag"):
            extra["ETag"] = '"caf\xe9"'  # obs-text: legal in HTTP, not UTF-8 (Latin-1)
        # Post/Redirect/Get: the create answers 303 See Other to the charge.
        self.answer(303 if self.headers.get("X-See-Other") else 201, charge, extra)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write("%d\n" % server.server_address[1])
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
