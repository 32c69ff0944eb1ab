#!/usr/bin/env python3
"""Prints a port that 127.0.0.1 can listen on now, for a server the test scripts stop and
start again on the same port (scripts/with-postgres.sh, scripts/nats-server.sh).

Drawn below the kernel's ephemeral ports (ip_local_port_range) and below 30000 (where a
Kubernetes node's NodePorts begin), so that while the server is down no other process's
bind to port 0 or outgoing connection takes it; where the system leaves no room there,
a port the kernel picks. harness/serve_process.cc's FreePort() does the same in C++."""
import random
import socket
import sys


def can_listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        return s.getsockname()[1]
    except OSError:
        return 0
    finally:
        s.close()


def main():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = min(low - 1, 29999)
    bottom = max(1024, low - 12000)
    if top - bottom >= 1000:
        for _ in range(200):
            port = can_listen(random.randint(bottom, top))
            if port:
                print(port)
                return 0
    port = can_listen(0)
    if not port:
        print("free-port.py: no port to listen on at 127.0.0.1", file=sys.stderr)
        return 1
    print(port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
