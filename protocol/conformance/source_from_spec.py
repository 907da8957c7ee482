#!/usr/bin/env python3
"""A migration SOURCE for the pagewire wire protocol, version 6, written from
protocol/PROTOCOL.md alone (without reading the Rust implementation), run against the
real destination: the `receive` example (examples/examples/receive.rs), a
`DestinationListener` that accepts one migration and writes the memory it received to
a file. It checks that a peer built from the document alone can complete a migration,
and that the destination ends with exactly the memory and device state the document
says those frames produce.

What it sends, on every channel, on the pages the document's affinity rule gives that
channel (LAYOUT: page p of region r belongs to channel ((p // chunk) + r) % count):
- round 0: ZERO frames covering every page of every region;
- round 1: raw pages with a touching zero run; zero and uniform runs alone; zstd with a
  uniform run; lz4; deflate and deflate-4k (per-page lengths, one page stored raw);
  a COPY of two pages from earlier pages of the same channel;
- round 3 (the final one): a delta page against its round-1 version; a ROUND_END COPY
  whose source pages belong to another channel;
- device state: two sections, each in two chunks, on channel 0; then COMPLETE, the
  ACK COMPLETE, COMMIT and the ACK COMMITTED.

It keeps its own image of what the destination's memory must hold and compares it
byte for byte with the receiver's file, and the sections' lengths and CRC32C with the
receiver's report. Three runs: 2 channels, 2 regions, CRC32C on every frame; 1 channel,
1 region, no checksum; 4 channels, 4 regions, CRC32C.

Run: python3 protocol/conformance/source_from_spec.py RECEIVE_BINARY [RECEIVER ARGS...]
(e.g. `--transport uring`: the receiver's channels read through io_uring)
(needs the zstandard and lz4 modules: Debian python3-zstandard python3-lz4).
Exit status 0 only if every run completes and every byte matches.
"""
import hashlib
import hmac
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import lz4.block
import zstandard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_from_spec import crc32c  # noqa: E402  (the same document's CRC32C)

PAGE = 4096
VERSION = 6
T_HELLO, T_WELCOME, T_REJECT, T_CONFIRM, T_READY = 1, 2, 3, 4, 5
T_LAYOUT, T_PAGES, T_EOR, T_ACK, T_DEV, T_COMPLETE, T_ABORT, T_COMMIT, T_COPY = range(0x10, 0x19)
RAW, ZERO, ZSTD, LZ4, DEFLATE, DELTA, DEFLATE4K = 1, 2, 3, 4, 5, 6, 7
F_PER_PAGE, F_CRC = 1, 2
ACK_ROUND, ACK_FRAMES, ACK_COMPLETE, ACK_COMMITTED = 1, 2, 3, 4
SESSION = b"pagewire-spec-01"
ACK_TIMEOUT = 30  # seconds a source waits for an ACK


class Failure(Exception):
    pass


def env(t, flags, body):
    return struct.pack("<BBHI", t, flags, 0, len(body)) + body


def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError(f"closed after {len(b)} of {n} bytes")
        b += c
    return b


def read_frame(s, limit):
    t, flags, reserved, ln = struct.unpack("<BBHI", recvn(s, 8))
    if reserved != 0:
        raise Failure("envelope reserved field is not zero")
    if 8 + ln > limit:
        raise Failure(f"frame of {8 + ln} bytes over the limit {limit}")
    return t, flags, recvn(s, ln)


def lst(fmt, items):
    return bytes([len(items)]) + b"".join(struct.pack("<" + fmt, i) for i in items)


def reject_text(b):
    reason = struct.unpack_from("<H", b)[0]
    p = 10
    p += 1 + 2 * b[p]
    p += 1 + b[p]
    p += 1 + b[p]
    return f"REJECT reason {reason}: {b[p + 1:p + 1 + b[p]].decode('utf-8', 'replace')!r}"


class Channel:
    """One TCP connection: HELLO/WELCOME/CONFIRM/READY, then frames out and ACKs in."""

    def __init__(self, port, idx, count, key, crc):
        self.idx, self.count, self.key, self.want_crc = idx, count, key, crc
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.acks = queue.Queue()
        self.round_frames = self.round_pages = 0
        # A hook that may change the frames sent after READY (mutate_receive.py):
        # called as tamper(channel, frame), it returns the frames to send instead.
        self.tamper = None

    def handshake(self, codecs, max_pages=256, max_frame=4 << 20):
        hello = (b"PAGEWIRE" + struct.pack("<HH", VERSION, VERSION) + SESSION
                 + struct.pack("<HHIII", self.idx, self.count, PAGE, max_pages, max_frame)
                 + os.urandom(32) + lst("H", codecs) + lst("B", [1] if self.want_crc else [])
                 + lst("B", [1]))
        self.s.sendall(env(T_HELLO, 0, hello))
        t, _, w = read_frame(self.s, 4096)
        if t == T_REJECT:
            raise Failure(f"channel {self.idx}: " + reject_text(w))
        if t != T_WELCOME:
            raise Failure(f"channel {self.idx}: expected WELCOME, got type {t:#x}")
        ver, ps, mp, mf = struct.unpack_from("<HIII", w)
        p = 14 + 32
        chosen = list(struct.unpack_from(f"<{w[p]}H", w, p + 1))
        p += 1 + 2 * w[p]
        checksum, auth = w[p], w[p + 1]
        p += 2
        body, proof = w[:p], w[p:]
        if ver != VERSION or ps != PAGE or not 1 <= mp <= max_pages or mf > max_frame:
            raise Failure(f"WELCOME out of what HELLO offered: v{ver} ps {ps} pages {mp} frame {mf}")
        if auth != 1 or len(proof) != 32:
            raise Failure("WELCOME did not choose the pre-shared key")
        want = hmac.new(self.key, b"pagewire v1 destination proof" + hello + body, hashlib.sha256)
        if not hmac.compare_digest(want.digest(), proof):
            raise Failure("WELCOME's proof does not verify")
        mine = hmac.new(self.key, b"pagewire v1 source proof" + hello + body, hashlib.sha256)
        self.s.sendall(env(T_CONFIRM, 0, mine.digest()))
        t, _, b = read_frame(self.s, 4096)
        if t == T_REJECT:
            raise Failure(f"channel {self.idx}: " + reject_text(b))
        if t != T_READY or b:
            raise Failure(f"channel {self.idx}: expected READY, got type {t:#x}")
        self.codecs, self.max_pages, self.max_frame = chosen, mp, mf
        self.crc = checksum == 1
        if self.want_crc != self.crc:
            raise Failure(f"checksum {checksum} chosen, {'CRC32C' if self.want_crc else 'none'} offered")
        self.s.settimeout(None)
        threading.Thread(target=self.reader, daemon=True).start()

    def reader(self):
        try:
            while True:
                t, _, b = read_frame(self.s, self.max_frame)
                if t == T_ACK:
                    kind, _, _, _, value = struct.unpack("<BBBBQ", b)
                    self.acks.put((kind, value))
                elif t == T_ABORT:
                    reason, n = struct.unpack_from("<HB", b)
                    self.acks.put(("ABORT", f"reason {reason}: {b[3:3 + n].decode('utf-8', 'replace')}"))
                    return
                elif t < 0x80:
                    self.acks.put(("UNEXPECTED", f"frame type {t:#x}"))
        except Exception as e:  # the connection ended
            self.acks.put(("EOF", repr(e)))

    def send(self, frame, pages=None):
        for f in (self.tamper(self, frame) if self.tamper else [frame]):
            self.s.sendall(f)
        if pages is not None:
            self.round_frames += 1
            self.round_pages += pages

    def end_round(self, rnd):
        self.send(env(T_EOR, 0, struct.pack("<IIQ", rnd, self.round_frames, self.round_pages)))
        self.round_frames = self.round_pages = 0

    def wait_ack(self, kind, value):
        end = time.time() + ACK_TIMEOUT
        while time.time() < end:
            try:
                k, v = self.acks.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                break
            if (k, v) == (kind, value):
                return
            if k in ("ABORT", "EOF", "UNEXPECTED"):
                raise Failure(f"channel {self.idx}: waiting for ACK {kind} {value}: {k} {v}")
        raise Failure(f"channel {self.idx}: no ACK {kind} {value} within {ACK_TIMEOUT} s")


def runs_bytes(runs):
    return b"".join(struct.pack("<QI", s, c) for s, c in runs)


def pages_frame(ch, codec, region, rnd, data, zero, uniform, payload, lengths=None):
    flags = (F_PER_PAGE if lengths is not None else 0) | (F_CRC if ch.crc else 0)
    hdr = struct.pack("<HHIIHH", codec, len(uniform), region, rnd, len(data), len(zero))
    hdr += runs_bytes(data) + runs_bytes(zero)
    hdr += b"".join(struct.pack("<QIB", s, c, byte) for s, c, byte in uniform)
    if lengths is not None:
        hdr += b"".join(struct.pack("<I", n) for n in lengths)
    e = struct.pack("<BBHI", T_PAGES, flags, 0, len(hdr) + (4 if ch.crc else 0) + len(payload))
    if ch.crc:
        return e + hdr + struct.pack("<I", crc32c(payload, crc32c(hdr, crc32c(e)))) + payload
    return e + hdr + payload


def copy_frame(ch, region, rnd, runs, copy_flags=0):
    hdr = struct.pack("<IIHH", region, rnd, len(runs), copy_flags)
    hdr += b"".join(struct.pack("<QIQ", *r) for r in runs)
    e = struct.pack("<BBHI", T_COPY, F_CRC if ch.crc else 0, 0, len(hdr) + (4 if ch.crc else 0))
    return e + hdr + (struct.pack("<I", crc32c(hdr, crc32c(e))) if ch.crc else b"")


def page_bytes(page, gen):
    return struct.pack("<QQ", page, gen) * (PAGE // 16)


def raw_deflate(data, wbits):
    c = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def migrate(receiver, channels, regions_n, crc, mem_mib=16, chunk=64, tamper=None, end=None):
    """One migration into a fresh `receive` process; raises Failure on any mismatch.

    `receiver` is the receive binary, or a list: the binary and arguments of its own.
    `tamper` is installed on every channel (Channel.tamper). With `end` (a dict), the
    receiver's stderr goes to the file end["stderr"]; whatever happened, the source
    then closes its connections and gives the receiver end["grace"] seconds to exit
    by itself, and end gets "exit" (its status, None if it had to be killed) and
    "stdout" (what it printed after "listening on")."""
    tmp = tempfile.mkdtemp(prefix="pagewire-spec-")
    key_file, out_file = os.path.join(tmp, "key"), os.path.join(tmp, "memory")
    # The tools read a key file's bytes with one trailing newline removed, so the key
    # itself never ends in one.
    key = os.urandom(31) + b"."
    with open(key_file, "wb") as f:
        f.write(key)
    cmd = receiver if isinstance(receiver, list) else [receiver]
    proc = subprocess.Popen(
        cmd + ["--listen", "127.0.0.1:0", "--key-file", key_file,
               "--session", SESSION.decode(), "--out", out_file, "--channels", str(channels)],
        stdout=subprocess.PIPE, stderr=end["stderr"] if end else None, text=True)
    chans = []
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise Failure(f"receiver did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        mem = mem_mib << 20
        per = mem // regions_n
        regions = [(i, i * per, per) for i in range(regions_n)]
        image = bytearray(mem)  # what the destination must hold, by guest address

        def put(region, page, data):
            at = regions[region][1] + page * PAGE
            image[at:at + len(data)] = data

        def get(region, page, count=1):
            at = regions[region][1] + page * PAGE
            return bytes(image[at:at + count * PAGE])

        for i in range(channels):
            chans.append(Channel(port, i, channels, key, crc))
        for c in chans:
            c.tamper = tamper
            c.handshake([RAW, ZERO, ZSTD, LZ4, DEFLATE, DELTA, DEFLATE4K])
            missing = {ZSTD, LZ4, DEFLATE, DELTA, DEFLATE4K} - set(c.codecs)
            if missing:
                raise Failure(f"the destination refused codecs {sorted(missing)}")
        layout = struct.pack("<II", len(regions), chunk) + b"".join(
            struct.pack("<IIQQ", r, PAGE, ga, ln) for r, ga, ln in regions)
        for c in chans:
            c.send(env(T_LAYOUT, 0, layout))

        def owner(region, page):
            return (page // chunk + region) % channels

        # Round 0: every page of every region as zero runs, each on its channel.
        for c in chans:
            for r, _, ln in regions:
                runs = []
                for first in range(0, ln // PAGE, chunk):
                    if owner(r, first) != c.idx:
                        continue
                    n = min(chunk, ln // PAGE - first)
                    if runs and runs[-1][0] + runs[-1][1] == first:
                        # Runs of one list must not touch: one run, merged.
                        runs[-1] = (runs[-1][0], runs[-1][1] + n)
                    else:
                        runs.append((first, n))
                    if sum(n for _, n in runs) + chunk > c.max_pages or len(runs) >= 200:
                        c.send(pages_frame(c, ZERO, r, 0, [], runs, [], b""), sum(n for _, n in runs))
                        runs = []
                if runs:
                    c.send(pages_frame(c, ZERO, r, 0, [], runs, [], b""), sum(n for _, n in runs))
            c.end_round(0)
        for c in chans:
            c.wait_ack(ACK_ROUND, 0)

        def chunk_start(ch_idx, region, k):
            """The first page of the k-th chunk of `region` that channel `ch_idx` owns."""
            seen, first = 0, 0
            while True:
                if owner(region, first) == ch_idx:
                    if seen == k:
                        return first
                    seen += 1
                first += chunk

        def deflated(first, count, gen, wbits):
            """Pages `first..first + count` of region 0, each one raw deflate stream."""
            payload, lengths = b"", []
            for p in range(first, first + count):
                put(0, p, page_bytes(p, gen))
                d = raw_deflate(page_bytes(p, gen), wbits)
                payload += d
                lengths.append(len(d))
            return payload, lengths

        # Round 1: every codec, on the first chunk region 0 gives each channel.
        zc = zstandard.ZstdCompressor(level=3)
        rnd = 1
        for c in chans:
            s = chunk_start(c.idx, 0, 0)
            data = b"".join(page_bytes(p, 0) for p in range(s, s + 4))
            put(0, s, data)
            c.send(pages_frame(c, RAW, 0, rnd, [(s, 4)], [(s + 4, 2)], [], data), 6)
            put(0, s + 9, b"\xcc" * 2 * PAGE)
            c.send(pages_frame(c, ZERO, 0, rnd, [], [(s + 6, 3)], [(s + 9, 2, 0xCC)], b""), 5)
            data = b"".join(page_bytes(p, 1) for p in range(s + 16, s + 24))
            put(0, s + 16, data)
            put(0, s + 24, b"\x5a" * PAGE)
            c.send(pages_frame(c, ZSTD, 0, rnd, [(s + 16, 8)], [], [(s + 24, 1, 0x5A)],
                               zc.compress(data)), 9)
            data = b"".join(page_bytes(p, 2) for p in range(s + 32, s + 40))
            put(0, s + 32, data)
            c.send(pages_frame(c, LZ4, 0, rnd, [(s + 32, 8)], [], [],
                               lz4.block.compress(data, store_size=False)), 8)
            payload, lengths = deflated(s + 48, 4, 3, -15)
            c.send(pages_frame(c, DEFLATE, 0, rnd, [(s + 48, 4)], [], [], payload, lengths), 4)
            payload, lengths = deflated(s + 56, 2, 4, -12)
            # A length of exactly one page: the page is stored as it is.
            put(0, s + 58, page_bytes(s + 58, 4))
            payload += page_bytes(s + 58, 4)
            lengths.append(PAGE)
            c.send(pages_frame(c, DEFLATE4K, 0, rnd, [(s + 56, 3)], [], [], payload, lengths), 3)
            # Pages s, s + 1 copied to s + 12, s + 13: the same channel, after their frame.
            put(0, s + 12, get(0, s, 2))
            c.send(copy_frame(c, 0, rnd, [(s + 12, 2, s)]), 2)
        for c in chans:
            c.end_round(rnd)
        for c in chans:
            c.wait_ack(ACK_ROUND, rnd)

        # Round 3, the final one: delta, and a ROUND_END copy from another channel's pages.
        rnd = 3
        round_end = []
        for c in chans:
            s = chunk_start(c.idx, 0, 0)
            # Delta against the page's round-1 content: 16 bytes at offset 100, then
            # 8 bytes at 4000 (skip 3884, a two-byte uleb128).
            skip = 4000 - 116
            d = bytes([100, 16]) + b"\xee" * 16 + bytes([0x80 | (skip & 0x7F), skip >> 7, 8]) + b"\xdd" * 8
            page = bytearray(get(0, s))
            page[100:116] = b"\xee" * 16
            page[4000:4008] = b"\xdd" * 8
            put(0, s, bytes(page))
            c.send(pages_frame(c, DELTA, 0, rnd, [(s, 1)], [], [], d, [len(d)]), 1)
            other = chunk_start((c.idx + 1) % channels, 0, 0) + 16
            target = chunk_start(c.idx, 0, 1)
            round_end.append((target, other))
            c.send(copy_frame(c, 0, rnd, [(target, 2, other)], 1), 2)
        for c in chans:
            c.end_round(rnd)
        for c in chans:
            c.wait_ack(ACK_ROUND, rnd)
        # Applied once every channel ended the round: sources as the round left them.
        sources = {t: get(0, o, 2) for t, o in round_end}
        for t, data in sources.items():
            put(0, t, data)

        # Device state on channel 0, each section in two chunks; then the switchover.
        sections = [("cpu", 0, os.urandom(1000)), ("devices", 3, os.urandom(70000))]
        for name, inst, data in sections:
            half = len(data) // 2
            for off, part in ((0, data[:half]), (half, data[half:])):
                body = (struct.pack("<I", inst) + bytes([len(name)]) + name.encode()
                        + struct.pack("<QQ", len(data), off) + part)
                chans[0].send(env(T_DEV, 0, body))
        chans[0].send(env(T_COMPLETE, 0, struct.pack("<II", rnd, len(sections))))
        chans[0].wait_ack(ACK_COMPLETE, rnd)
        chans[0].send(env(T_COMMIT, 0, struct.pack("<I", rnd)))
        chans[0].wait_ack(ACK_COMMITTED, rnd)
        committed = time.time()
        out, _ = proc.communicate(timeout=60)
        if end is not None:
            end["stdout"] = out
        if end is None:
            print(f"  receiver exited {time.time() - committed:.2f} s after ACK COMMITTED")
        report = json.loads(out.strip().splitlines()[-1])
        if report.get("status") != "completed":
            raise Failure(f"receiver: {report}")
        if report["final_round"] != rnd:
            raise Failure(f"receiver's final round {report['final_round']}, sent {rnd}")
        got = [(s["name"], s["instance"], s["len"], s["crc32c"]) for s in report["device_state"]]
        want = [(n, i, len(d), crc32c(d)) for n, i, d in sections]
        if got != want:
            raise Failure(f"device state {got}, sent {want}")
        with open(out_file, "rb") as f:
            memory = f.read()
        if len(memory) != mem:
            raise Failure(f"receiver's memory is {len(memory)} bytes, the layout {mem}")
        if memory != bytes(image):
            bad = [p for p in range(mem // PAGE) if memory[p * PAGE:(p + 1) * PAGE] != image[p * PAGE:(p + 1) * PAGE]]
            raise Failure(f"{len(bad)} pages differ, the first at guest page {bad[0]}")
        written = sum(1 for p in range(mem // PAGE) if any(image[p * PAGE:(p + 1) * PAGE]))
        return written, report["stats"].get("frames")
    finally:
        for c in chans:
            try:
                c.s.shutdown(socket.SHUT_RDWR)  # wakes its reader; close alone would not
            except OSError:
                pass
            c.s.close()
        if end is not None:
            try:
                end["exit"] = proc.wait(end["grace"])
                if not proc.stdout.closed:
                    end["stdout"] = proc.stdout.read()
            except subprocess.TimeoutExpired:
                end["exit"], end["stdout"] = None, ""
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (key_file, out_file):
            if os.path.exists(f):
                os.remove(f)
        os.rmdir(tmp)


def main():
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        return 2
    # Anything after the binary goes to it (e.g. `--transport uring`).
    receiver = sys.argv[1:]
    failed = 0
    runs = ((2, 2, True), (1, 1, False), (4, 4, True))
    for channels, regions, crc in runs:
        what = f"{channels} channel(s), {regions} region(s), {'CRC32C' if crc else 'no checksum'}"
        try:
            written, frames = migrate(receiver, channels, regions, crc)
            print(f"ok      {what}: memory and device state match ({written} non-zero pages, "
                  f"{frames} PAGES frames applied)")
        except (Failure, OSError, EOFError, ValueError, subprocess.TimeoutExpired) as e:
            failed += 1
            print(f"FAILED  {what}: {e}")
    print(f"{len(runs) - failed} ok, {failed} failed, of {len(runs)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
