#!/usr/bin/env python3
"""The other side of `converge gateway` in its tests, in Python (standard library only) on
purpose: the providers that send webhooks and the internal services that receive them are
not written in C++.

  peer.py target PORT_FILE SECRET
      An internal target on 127.0.0.1 (free port written to PORT_FILE). POST /hooks/<x>
      verifies the gateway's Standard Webhooks signature with SECRET (whsec_...) and records
      the delivery by webhook-id (401 when the signature is wrong). POST /faults
      {"status": s, "times": n, "retry_after": seconds, "id": webhook-id} answers the next n
      deliveries (of that id only, when "id" is given) with s; {"clear": true} drops every
      fault still pending. GET /stats:
      {"deliveries": {webhook-id: n}, "bad_signatures": n, "last": {...},
       "attempts": [[path, webhook-id, status], ...] in the order they arrived}.
  peer.py send SCHEME URL SECRET ID BODY [AGE_SECONDS]
      Signs BODY as a provider would (SCHEME: standard, stripe or github; stripe takes its
      event id from BODY) AGE_SECONDS ago, POSTs it to URL, prints the HTTP status.
"""
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
state = {"deliveries": {}, "bad_signatures": 0, "faults": [], "last": {}, "attempts": []}


def standard_signature(secret, msg_id, ts, body):
    key = base64.b64decode(secret[len("whsec_"):] if secret.startswith("whsec_") else secret)
    mac = hmac.new(key, ("%s.%s." % (msg_id, ts)).encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Target(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    secret = ""

    def log_message(self, *args):
        pass

    def answer(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            return self.answer(200, {k: state[k] for k in ("deliveries", "bad_signatures",
                                                           "last", "attempts")})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/faults":
            with lock:
                f = json.loads(body)
                if f.get("clear"):
                    state["faults"] = []
                else:
                    state["faults"] += [f] * f.get("times", 1)
            return self.answer(200, {"ok": True})
        msg_id = self.headers.get("webhook-id", "")
        ts = self.headers.get("webhook-timestamp", "")
        given = self.headers.get("webhook-signature", "").split(" ")
        if standard_signature(Target.secret, msg_id, ts, body) not in given:
            with lock:
                state["bad_signatures"] += 1
            return self.answer(401, {"error": "bad signature"})
        with lock:
            fault = next((f for f in state["faults"] if f.get("id", msg_id) == msg_id), None)
            if fault is not None:
                state["faults"].remove(fault)
            state["attempts"].append([self.path, msg_id, fault["status"] if fault else 200])
            if fault is None:
                state["deliveries"][msg_id] = state["deliveries"].get(msg_id, 0) + 1
                state["last"] = {"id": msg_id, "body": body.decode(), "path": self.path}
        if fault:
            extra = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            return self.answer(fault["status"], {"error": "injected"}, extra)
        self.answer(200, {"ok": True})


def send(scheme, url, secret, msg_id, body, age):
    body = body.encode()
    ts = int(time.time()) - age
    headers = {"Content-Type": "application/json"}
    if scheme == "standard":
        headers.update({"webhook-id": msg_id, "webhook-timestamp": str(ts),
                        "webhook-signature": standard_signature(secret, msg_id, ts, body)})
    elif scheme == "stripe":
        mac = hmac.new(secret.encode(), b"%d." % ts + body, hashlib.sha256).hexdigest()
        headers["Stripe-Signature"] = "t=%d,v1=%s" % (ts, mac)
    elif scheme == "github":
        mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers.update({"X-Hub-Signature-256": "sha256=" + mac, "X-GitHub-Delivery": msg_id,
                        "X-GitHub-Event": "push"})
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            print(r.status)
    except urllib.error.HTTPError as e:
        print(e.code)


def main():
    if sys.argv[1] == "target":
        Target.secret = sys.argv[3]
        server = ThreadingHTTPServer(("127.0.0.1", 0), Target)
        with open(sys.argv[2] + ".tmp", "w") as f:
            f.write("%d\n" % server.server_address[1])
        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
        server.serve_forever()
    else:
        age = int(sys.argv[7]) if len(sys.argv) > 7 else 0
        send(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], age)


if __name__ == "__main__":
    main()
