#!/usr/bin/env python3
"""Instructions Redis spends per request in the batch script, counted by callgrind.

Seconds on a shared 2-core machine swing between runs; instructions do not. This starts
`redis-server` under `valgrind --tool=callgrind`, loads the batch script as the tracker
builds it (`src/redis/core.lua`, `window.lua`, then `batch.lua`), and sends batches the
way a busy replica does: BATCH reservations of new leases (no windows) over 64 tenants,
then their releases, ROUNDS times. It runs twice (ROUNDS and 4 x ROUNDS) and prints the difference per
request (one reservation and one release), which leaves out the server's start and stop.

    python3 .ci/redis_instructions.py [BATCH=20] [ROUNDS=100]

Needs redis-server and valgrind.
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

TENANTS = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def batch_script():
    lua = os.path.join(HERE, "..", "src", "redis")
    names = ("core.lua", "window.lua", "batch.lua")
    return "".join(open(os.path.join(lua, name)).read() for name in names)


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def read(reply):
    line = reply.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind in b"+:":
        return rest
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reply.read(size + 2)[:-2]
    return [read(reply) for _ in range(int(rest))]


def count(batch, rounds):
    """Instructions of a redis-server that ran `rounds` rounds of `batch` requests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tempfile.NamedTemporaryFile(suffix=".callgrind", delete=False).name
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server",
         "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise RuntimeError("redis-server did not start under valgrind")
    reply = conn.makefile("rb")

    def call(*args):
        conn.sendall(encode(*args))
        return read(reply)

    sha = call("SCRIPT", "LOAD", batch_script())
    key = "tenant-tokens:{t:tenant-%d}:tokens"
    lease = 0
    for _ in range(rounds):
        ops = []
        keys, args = [], ["3000"]
        for _ in range(batch):
            lease += 1
            tenant, lease_id = lease % TENANTS, "r1a2b3c4d5e6f7a8:%d" % lease
            ops.append((tenant, lease_id))
            keys.append(key % tenant)
            args += ["r", lease_id, 100, 1 << 40]
        answers = call("EVALSHA", sha, len(keys), *keys, *args)
        assert all(int(status) == 1 for status in answers[0::2]), answers
        keys, args = [], ["3000"]
        for tenant, lease_id in ops:
            keys.append(key % tenant)
            args += ["x", lease_id]
        answers = call("EVALSHA", sha, len(keys), *keys, *args)
        assert all(int(found) == 1 for found in answers[0::2]), answers
    call("SHUTDOWN", "NOSAVE")
    server.wait()
    totals = re.search(r"^totals: (\d+)", open(out).read(), re.M)
    os.unlink(out)
    return int(totals.group(1))


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    few, many = count(batch, rounds), count(batch, 4 * rounds)
    per_request = (many - few) / (3 * rounds * batch)
    print(f"batches of {batch}: {per_request:,.0f} redis-server instructions per request "
          f"(a reservation and its release)")


if __name__ == "__main__":
    main()
