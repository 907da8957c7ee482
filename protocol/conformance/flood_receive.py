#!/usr/bin/env python3
"""Stands in for the `receive` example in front of source_from_spec.py, and floods the
destination's listener with hostile connections before the source may connect.

    PAGEWIRE_RECEIVE=target/release/examples/receive \\
        python3 protocol/conformance/source_from_spec.py protocol/conformance/flood_receive.py

It starts the real receiver with the arguments it was given, reads its "listening on
ADDR" line, and opens, from five threads: 300 connections that send nothing, 50 that
send 64 KiB of random bytes, 50 that send one byte every half second (never a whole
frame), 50 that send a frame header claiming a huge length and 50 that send a whole
HELLO naming the session being accepted (its id is in the receiver's arguments, and
travels in clear without TLS) and then never CONFIRM. Only once all of them
were opened (then 2 s later) does it pass the "listening on" line on, so the source
connects behind the whole flood, as it would behind an attacker who got there first.
Then it relays the receiver's output and exit status. It fails (exit 3) if the flood
could not be opened. Everything stays on loopback and stops within 30 s.
"""
import os
import socket
import struct
import subprocess
import sys
import threading
import time

PAGE, VERSION = 4096, 6


def env(t, flags, body):
    """A frame: PROTOCOL.md's 8-byte envelope, then the body."""
    return struct.pack("<BBHI", t, flags, 0, len(body)) + body


def lst(fmt, items):
    """A list: a one-byte count, then the items."""
    return bytes([len(items)]) + b"".join(struct.pack("<" + fmt, i) for i in items)

IDLE, GARBAGE, SLOW, BIG, NAMED = 300, 50, 50, 50, 50


def main():
    real = os.environ.get("PAGEWIRE_RECEIVE")
    if not real:
        sys.stderr.write("flood_receive.py: set PAGEWIRE_RECEIVE to the receive example\n")
        return 2
    proc = subprocess.Popen([real] + sys.argv[1:], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    host, port = line.split()[-1].rsplit(":", 1)
    addr = (host, int(port))
    held, lock = [], threading.Lock()
    opened = {"idle": 0, "garbage": 0, "slow": 0, "big": 0, "named": 0}
    session = sys.argv[sys.argv.index("--session") + 1].encode()
    # HELLO as PROTOCOL.md writes it: channel 0 of 1, raw and zero, no checksum.
    hello = env(1, 0, b"PAGEWIRE" + struct.pack("<HH", VERSION, VERSION) + session
                + struct.pack("<HHIII", 0, 1, PAGE, 256, 4 << 20) + os.urandom(32)
                + lst("H", [1, 2]) + lst("B", []) + lst("B", [1]))
    stop = time.time() + 30

    def conn(kind, first=b""):
        try:
            s = socket.create_connection(addr, timeout=2)
        except OSError:
            return None
        with lock:
            held.append(s)
            opened[kind] += 1
        try:
            # The receiver may close it as soon as it read enough (garbage).
            s.sendall(first)
        except OSError:
            pass
        return s

    def slow():
        socks = [s for s in (conn("slow") for _ in range(SLOW)) if s]
        while time.time() < stop and proc.poll() is None:
            for s in socks:
                try:
                    s.send(b"\x01")
                except OSError:
                    pass
            time.sleep(0.5)

    jobs = [
        lambda: [conn("idle") for _ in range(IDLE)],
        lambda: [conn("garbage", os.urandom(65536)) for _ in range(GARBAGE)],
        slow,
        lambda: [conn("big", bytes([1, 0, 0, 0]) + b"\xff" * 60) for _ in range(BIG)],
        lambda: [conn("named", hello) for _ in range(NAMED)],
    ]
    threads = [threading.Thread(target=j, daemon=True) for j in jobs]
    for t in threads:
        t.start()
    want = IDLE + GARBAGE + SLOW + BIG + NAMED
    while sum(opened.values()) < want and time.time() < stop:
        time.sleep(0.05)
    time.sleep(2)
    flood = dict(opened)
    sys.stderr.write(f"  flood ahead of the source: {flood}\n")
    if sum(flood.values()) < want:
        proc.kill()
        sys.stderr.write(f"flood_receive.py: opened {sum(flood.values())} of {want}\n")
        return 3
    t0 = time.time()
    sys.stdout.write(line)
    sys.stdout.flush()
    out = proc.stdout.read()
    code = proc.wait()
    sys.stderr.write(f"  receiver done {time.time() - t0:.2f} s after the source was let in\n")
    stop = 0
    with lock:
        for s in held:
            s.close()
    sys.stdout.write(out)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
