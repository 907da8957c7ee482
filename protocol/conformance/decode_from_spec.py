#!/usr/bin/env python3
"""An independent decoder for the pagewire wire protocol, version 6, written from
protocol/PROTOCOL.md alone (without reading the Rust implementation), to check that the
document is enough to implement the protocol. It decodes every golden sample in
protocol/tests/golden: envelopes, every field and rule the document states for a lone
frame, CRC32C where carried, and PAGES payloads through their codecs (zstd, lz4,
deflate, deflate-4k with its 4096-byte distance limit, delta) into pages of the stated
sizes. Then it flips single bits in the first 80 bytes of every CRC-carrying sample and
requires each flipped copy to be rejected (so the check can fail).

Run: python3 protocol/conformance/decode_from_spec.py [GOLDEN_DIR]
(needs the zstandard and lz4 modules: Debian python3-zstandard python3-lz4).
Exit status 0 only if every sample decodes and every flipped copy is rejected.

Session parameters a lone sample cannot carry are those PROTOCOL.md gives for the
golden samples ("The golden samples"): page size 4096, delta against zero pages;
every codec of the table is accepted, CRC presence is taken from the flags, max_pages
is the protocol maximum 65536, the frame limit 64 MiB after the handshake.
"""
import glob
import hashlib
import os
import struct
import sys
import zlib

import lz4.block
import zstandard

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden")
PAGE_SIZE = 4096
MAX_PAGES = 65536
HANDSHAKE_LIMIT = 4096
MAX_FRAME = 64 << 20


class ProtoError(Exception):
    def __init__(self, kind, msg=""):
        super().__init__(f"{kind}: {msg}" if msg else kind)
        self.kind = kind


# ---------------------------------------------------------------- CRC32C
def _crc_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_T = _crc_table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


# ---------------------------------------------------------------- reader
class R:
    def __init__(self, buf):
        self.b = bytes(buf)
        self.p = 0

    def take(self, n, what="field"):
        if n < 0 or self.p + n > len(self.b):
            raise ProtoError("Truncated", f"{what} needs {n} bytes at body offset {self.p}, "
                                          f"{len(self.b) - self.p} left")
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def u8(self, w="u8"):
        return self.take(1, w)[0]

    def u16(self, w="u16"):
        return struct.unpack("<H", self.take(2, w))[0]

    def u32(self, w="u32"):
        return struct.unpack("<I", self.take(4, w))[0]

    def u64(self, w="u64"):
        return struct.unpack("<Q", self.take(8, w))[0]

    def list_(self, fn, w="list"):
        n = self.u8(w + ".count")
        return [fn(w) for _ in range(n)]

    def rest(self):
        v = self.b[self.p:]
        self.p = len(self.b)
        return v

    def left(self):
        return len(self.b) - self.p

    def end(self):
        if self.p != len(self.b):
            raise ProtoError("TrailingBytes", f"{len(self.b) - self.p} bytes after last field")


def utf8(b, what):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtoError("InvalidField", f"{what} not UTF-8: {e}")


def pow2(x):
    return x > 0 and x & (x - 1) == 0


def need(cond, kind, msg):
    if not cond:
        raise ProtoError(kind, msg)


U64 = (1 << 64) - 1

FRAME_NAMES = {0x01: "HELLO", 0x02: "WELCOME", 0x03: "REJECT", 0x04: "CONFIRM", 0x05: "READY",
               0x10: "LAYOUT", 0x11: "PAGES", 0x12: "END_OF_ROUND", 0x13: "ACK",
               0x14: "DEVICE_STATE", 0x15: "COMPLETE", 0x16: "ABORT", 0x17: "COMMIT",
               0x18: "COPY"}
CODECS = {1: ("raw", "block"), 2: ("zero", "none"), 3: ("zstd", "block"), 4: ("lz4", "block"),
          5: ("deflate", "per-page"), 6: ("delta", "per-page"), 7: ("deflate-4k", "per-page")}
CHECKSUMS = {0: "none", 1: "crc32c"}
AUTHS = {0: "none", 1: "hmac-sha256", 2: "hmac-sha256-tls-exporter"}
REJECT_REASONS = {1: "UNSUPPORTED_VERSION", 2: "PAGE_SIZE_MISMATCH", 3: "NO_COMMON_CODEC",
                  4: "AUTH_REQUIRED", 5: "AUTH_FAILED", 6: "UNKNOWN_SESSION", 7: "BAD_CHANNEL",
                  8: "BAD_PARAMETERS", 9: "PROTOCOL_ERROR", 10: "PEER_NOT_AUTHENTICATED",
                  11: "ENCRYPTION_REQUIRED", 12: "ENCRYPTION_UNSUPPORTED"}
ABORT_REASONS = {1: "CANCELLED", 2: "BAD_FRAME", 3: "CHANNEL_FAILED", 4: "APPLY_FAILED",
                 5: "INTERNAL", 6: "TIMEOUT"}
ACK_KINDS = {1: "ROUND", 2: "FRAMES", 3: "COMPLETE", 4: "COMMITTED"}


# ---------------------------------------------------------------- envelope
def read_envelope(buf, pos, handshake):
    if len(buf) - pos < 8:
        raise ProtoError("Truncated", "envelope")
    ftype, flags, reserved, length = struct.unpack_from("<BBHI", buf, pos)
    need(reserved == 0, "InvalidField", f"envelope reserved={reserved:#x}")
    limit = HANDSHAKE_LIMIT if handshake else MAX_FRAME
    need(8 + length <= limit, "FrameTooLarge", f"{8 + length} > {limit}")
    if pos + 8 + length > len(buf):
        raise ProtoError("Truncated", f"body of {length} bytes, {len(buf) - pos - 8} present")
    return ftype, flags, length


def check_flags(name, flags, allowed):
    need(flags & ~allowed == 0, "InvalidFlags", f"{name} flags {flags:#04x}")


# ---------------------------------------------------------------- handshake bodies
def read_limits(r, out):
    """page_size, max_pages, max_frame_bytes and nonce: the same in HELLO and WELCOME."""
    out["page_size"] = ps = r.u32()
    need(pow2(ps) and 4096 <= ps <= 2097152, "InvalidField", f"page_size {ps}")
    out["max_pages"] = mp = r.u32()
    need(1 <= mp <= 65536, "InvalidField", f"max_pages {mp}")
    out["max_frame_bytes"] = mf = r.u32()
    need(ps + 1024 <= mf <= 64 << 20, "InvalidField", f"max_frame_bytes {mf}")
    out["nonce"] = r.take(32).hex()[:8] + ".."


def d_hello(r, flags, env):
    check_flags("HELLO", flags, 0)
    out = {}
    magic = r.take(8, "magic")
    need(magic == b"PAGEWIRE", "BadMagic", repr(magic))
    out["version_min"] = vmin = r.u16()
    out["version_max"] = vmax = r.u16()
    need(vmin >= 1, "InvalidField", "version_min 0")
    need(vmax >= vmin, "InvalidField", "version_max < version_min")
    out["session"] = r.take(16).hex()
    out["channel"] = ch = r.u16()
    out["channel_count"] = cc = r.u16()
    need(cc >= 1, "InvalidField", "channel_count 0")
    need(ch < cc, "InvalidField", f"channel {ch} >= channel_count {cc}")
    read_limits(r, out)
    out["codecs"] = r.list_(lambda w: r.u16(w), "codecs")
    out["checksums"] = r.list_(lambda w: r.u8(w), "checksums")
    out["auth"] = r.list_(lambda w: r.u8(w), "auth")
    r.end()
    need(1 in out["codecs"] and 2 in out["codecs"], "InvalidField",
         "raw and zero must be in every side's codec list")
    return out


def d_welcome(r, flags, env):
    check_flags("WELCOME", flags, 0)
    out = {}
    out["version"] = r.u16()
    read_limits(r, out)
    out["codecs"] = r.list_(lambda w: r.u16(w), "codecs")
    need(1 in out["codecs"], "ProtocolError", "WELCOME codecs lack raw")
    out["checksum"] = cs = r.u8()
    out["auth"] = au = r.u8()
    need(cs in CHECKSUMS, "ProtocolError", f"checksum id {cs}")
    need(au in AUTHS, "ProtocolError", f"auth id {au}")
    if au != 0:
        out["proof"] = r.take(32, "proof").hex()[:8] + ".."
    r.end()
    return out


def d_reject(r, flags, env):
    check_flags("REJECT", flags, 0)
    out = {}
    rc = r.u16()
    out["reason"] = f"{rc} {REJECT_REASONS.get(rc, '?')}"
    out["version_min"] = r.u16()
    out["version_max"] = r.u16()
    out["page_size"] = r.u32()
    out["codecs"] = r.list_(lambda w: r.u16(w), "codecs")
    out["checksums"] = r.list_(lambda w: r.u8(w), "checksums")
    out["auth"] = r.list_(lambda w: r.u8(w), "auth")
    n = r.u8("message.count")
    out["message"] = utf8(r.take(n, "message"), "message")
    r.end()
    return out


def d_confirm(r, flags, env):
    check_flags("CONFIRM", flags, 0)
    n = r.left()
    need(n in (0, 32), "InvalidField" if n > 32 else "Truncated", f"CONFIRM body {n}")
    out = {"proof": r.take(32).hex()[:8] + ".." if n == 32 else None}
    r.end()
    return out


def d_ready(r, flags, env):
    check_flags("READY", flags, 0)
    r.end()
    return {}


# ---------------------------------------------------------------- session bodies
def d_layout(r, flags, env):
    check_flags("LAYOUT", flags, 0)
    count = r.u32("count")
    chunk = r.u32("chunk_pages")
    need(chunk >= 1, "InvalidField", "chunk_pages 0")
    need(count * 24 == r.left(), "InvalidField" if count * 24 < r.left() else "Truncated",
         f"count {count} x 24 != {r.left()} bytes left")
    need(count <= 256, "LimitExceeded", f"regions {count} > 256")
    regions = []
    total = 0
    for _ in range(count):
        rid, bps, ga, ln = r.u32(), r.u32(), r.u64(), r.u64()
        need(ln > 0, "InvalidField", f"region {rid} length 0")
        need(ga % PAGE_SIZE == 0 and ln % PAGE_SIZE == 0, "InvalidField",
             f"region {rid} not page-aligned")
        need(ga + ln <= U64 + 1, "InvalidField", f"region {rid} overflows")
        need(pow2(bps) and bps >= PAGE_SIZE, "InvalidField", f"region {rid} backing {bps}")
        regions.append((rid, bps, ga, ln))
        total += ln
    r.end()
    ids = [x[0] for x in regions]
    need(len(set(ids)) == len(ids), "InvalidField", "duplicate region id")
    s = sorted(regions, key=lambda x: x[2])
    for a, b in zip(s, s[1:]):
        need(a[2] + a[3] <= b[2], "InvalidField", f"regions {a[0]} and {b[0]} overlap")
    need(total <= 16 << 30, "LimitExceeded", f"guest memory {total}")
    env["layout"] = {rid: (bps, ga, ln) for rid, bps, ga, ln in regions}
    env["chunk_pages"] = chunk
    return {"count": count, "chunk_pages": chunk,
            "regions": [f"id={rid} backing={bps:#x} addr={ga:#x} len={ln:#x}"
                        for rid, bps, ga, ln in regions]}


def runs_canonical(runs, what, touch_ok=None):
    """runs: list of tuples (start, count, ...); ascending, non-overlapping, and
    touching only when touch_ok(prev, cur)."""
    for i, run in enumerate(runs):
        s, c = run[0], run[1]
        need(c >= 1, "RunsNotCanonical", f"{what} run {i} count 0")
        need(s + c <= U64 + 1, "RunsNotCanonical", f"{what} run {i} overflows")
        # "start + count does not overflow": taken as start+count <= 2^64 - 1? see report
        need(s + c <= U64, "RunsNotCanonical", f"{what} run {i} start+count == 2^64")
        if i:
            p = runs[i - 1]
            need(s >= p[0] + p[1], "RunsNotCanonical", f"{what} runs {i-1},{i} unordered/overlap")
            if s == p[0] + p[1]:
                need(touch_ok is not None and touch_ok(p, run), "RunsNotCanonical",
                     f"{what} runs {i-1},{i} touch")


def page_set(runs):
    return [(s, s + c) for s, c, *_ in runs]


def check_disjoint(a, b, what):
    for s1, e1 in a:
        for s2, e2 in b:
            need(e1 <= s2 or e2 <= s1, "RunsNotCanonical", f"page in two lists ({what})")


def check_region(env, region, ranges):
    lay = env.get("layout")
    if lay is None:
        return "no-layout-context"
    if region not in lay:
        return f"region {region} not in layout sample (UnknownRegion in a real session)"
    npages = lay[region][2] // PAGE_SIZE
    for s, e in ranges:
        need(e <= npages, "PageOutOfRange", f"page {e - 1} >= {npages}")
    return "in-layout"


def uleb(r, limit, what):
    v = 0
    shift = 0
    nbytes = 0
    while True:
        b = r.u8(what)
        nbytes += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
        need(nbytes < 10, "InvalidField", f"{what} ULEB too long")
    # minimal encoding: last byte must be non-zero unless it is the only byte
    need(nbytes == 1 or b != 0, "InvalidField", f"{what} ULEB not minimal")
    need(v <= limit, "InvalidField", f"{what} {v} > page_size")
    return v


def delta_apply(data, base):
    page = bytearray(base)
    r = R(data)
    pos = 0
    first = True
    nrec = 0
    while r.left():
        skip = uleb(r, PAGE_SIZE, "skip")
        ln = uleb(r, PAGE_SIZE, "len")
        need(ln >= 1, "InvalidField", "delta record len 0")
        need(skip >= 1 or first, "InvalidField", "delta skip 0 after first record")
        first = False
        pos += skip
        need(pos + ln <= PAGE_SIZE, "InvalidField", "delta passes page_size")
        page[pos:pos + ln] = r.take(ln, "delta bytes")
        pos += ln
        nrec += 1
    return bytes(page), nrec


def inflate_page(data, what):
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data, PAGE_SIZE + 1)
    except zlib.error as e:
        raise ProtoError("Codec", f"{what}: {e}")
    need(d.eof, "Codec", f"{what}: deflate stream not finished")
    need(not d.unused_data and not d.unconsumed_tail, "Codec", f"{what}: bytes after stream")
    need(len(out) == PAGE_SIZE, "Codec", f"{what}: inflated {len(out)} != {PAGE_SIZE}")
    return out


def deflate_max_distance(data):
    """Parse a raw deflate stream to find the largest back-reference distance."""
    bits = int.from_bytes(data, "little")
    pos = [0]

    def get(n):
        v = (bits >> pos[0]) & ((1 << n) - 1)
        pos[0] += n
        return v

    LBASE = [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83,
             99, 115, 131, 163, 195, 227, 258]
    LEXT = [0] * 8 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [0]
    DBASE = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769,
             1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577]
    DEXT = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11,
            12, 12, 13, 13]

    def build(lengths):
        codes = {}
        maxb = max(lengths) if lengths else 0
        bl_count = [0] * (maxb + 1)
        for l in lengths:
            if l:
                bl_count[l] += 1
        code = 0
        nxt = [0] * (maxb + 2)
        for b in range(1, maxb + 1):
            code = (code + bl_count[b - 1]) << 1
            nxt[b] = code
        for sym, l in enumerate(lengths):
            if l:
                codes[(l, nxt[l])] = sym
                nxt[l] += 1
        return codes

    def decode(tab):
        code = 0
        for l in range(1, 16):
            code = (code << 1) | get(1)
            if (l, code) in tab:
                return tab[(l, code)]
        raise ProtoError("Codec", "bad huffman code")

    fixed_l = build([8] * 144 + [9] * 112 + [7] * 24 + [8] * 8)
    fixed_d = build([5] * 30)
    maxd = 0
    while True:
        final = get(1)
        bt = get(2)
        if bt == 0:
            pos[0] = (pos[0] + 7) // 8 * 8
            ln = get(16)
            get(16)
            pos[0] += 8 * ln
        elif bt in (1, 2):
            if bt == 1:
                lt, dt = fixed_l, fixed_d
            else:
                hlit, hdist, hclen = get(5) + 257, get(5) + 1, get(4) + 4
                order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]
                cl = [0] * 19
                for i in range(hclen):
                    cl[order[i]] = get(3)
                ct = build(cl)
                lens = []
                while len(lens) < hlit + hdist:
                    s = decode(ct)
                    if s < 16:
                        lens.append(s)
                    elif s == 16:
                        lens += [lens[-1]] * (3 + get(2))
                    elif s == 17:
                        lens += [0] * (3 + get(3))
                    else:
                        lens += [0] * (11 + get(7))
                lt, dt = build(lens[:hlit]), build(lens[hlit:])
            while True:
                s = decode(lt)
                if s < 256:
                    continue
                if s == 256:
                    break
                get(LEXT[s - 257])
                ds = decode(dt)
                d = DBASE[ds] + get(DEXT[ds])
                maxd = max(maxd, d)
        else:
            raise ProtoError("Codec", "deflate block type 3")
        if final:
            return maxd


def d_pages(r, flags, env, payload_external=None):
    """payload_external: for RDMA READ_PAGES, the body holds the header only."""
    check_flags("PAGES", flags, 0x03)
    per_page = bool(flags & 1)
    has_crc = bool(flags & 2)
    out = {"flags": f"{'PER_PAGE ' if per_page else ''}{'CRC32C' if has_crc else ''}".strip()}
    codec = r.u16("codec")
    nuni = r.u16("uniform_runs")
    region = r.u32("region")
    rnd = r.u32("round")
    ndata = r.u16("data_runs")
    nzero = r.u16("zero_runs")
    data = [(r.u64(), r.u32()) for _ in range(ndata)]
    zero = [(r.u64(), r.u32()) for _ in range(nzero)]
    uni = [(r.u64(), r.u32(), r.u8()) for _ in range(nuni)]
    need(codec in CODECS, "CodecNotNegotiated", f"codec {codec}")
    cname, clayout = CODECS[codec]
    out.update(codec=f"{codec} {cname}", region=region, round=rnd)
    # canonical runs
    runs_canonical(data, "data")
    runs_canonical(zero, "zero")
    runs_canonical(uni, "uniform", touch_ok=lambda p, c: p[2] != c[2])
    for s, c, b in uni:
        need(b != 0, "InvalidField", "uniform byte 0")
    check_disjoint(page_set(data), page_set(zero), "data/zero")
    check_disjoint(page_set(data), page_set(uni), "data/uniform")
    check_disjoint(page_set(zero), page_set(uni), "zero/uniform")
    dp = sum(c for _, c in data)
    zp = sum(c for _, c in zero)
    up = sum(c for _, c, _ in uni)
    need(1 <= dp + zp + up <= MAX_PAGES, "PageCount", f"{dp + zp + up} pages")
    # layout flag vs codec
    need(per_page == (clayout == "per-page"), "InvalidFlags",
         f"PER_PAGE={per_page} but codec {cname} layout is {clayout}")
    need((ndata == 0) == (cname == "zero"), "InvalidField",
         f"data_runs={ndata} with codec {cname}")
    lengths = [r.u32("lengths") for _ in range(dp)] if per_page else None
    header_len = r.p + (4 if has_crc else 0)
    crc = r.u32("crc") if has_crc else None
    out["region_check"] = check_region(env, region, page_set(data) + page_set(zero) + page_set(uni))
    if payload_external is not None:
        out["header_len"] = header_len
        return out, (data, zero, uni, lengths, crc, header_len)
    payload = r.rest()
    env_bytes = env["_envelope"]
    if has_crc:
        body = r.b
        calc = crc32c(env_bytes + body[:header_len - 4] + payload)
        need(calc == crc, "ChecksumMismatch", f"crc {crc:#010x} != computed {calc:#010x}")
        out["crc"] = f"{crc:#010x} ok"
    pages = decode_payload(cname, clayout, data, zero, uni, lengths, payload, dp)
    out["runs"] = (" data=" + ",".join(f"{s}+{c}" for s, c in data) if data else "") + \
                  (" zero=" + ",".join(f"{s}+{c}" for s, c in zero) if zero else "") + \
                  (" uniform=" + ",".join(f"{s}+{c}:{b:#04x}" for s, c, b in uni) if uni else "")
    out["payload"] = len(payload)
    out["decoded"] = f"{dp}+{zp}+{up} pages (data+zero+uniform) = {sum(len(v) for v in pages.values())} bytes"
    h = hashlib.sha256()
    for idx in sorted(pages):
        h.update(struct.pack("<Q", idx) + pages[idx])
    out["pages_sha256"] = h.hexdigest()[:16]
    if "_maxdist" in ENV_SIDE:
        out["max_back_distance"] = ENV_SIDE["_maxdist"]
    if "_delta" in ENV_SIDE:
        out["delta_pages"] = ENV_SIDE["_delta"]
    return out, None


def decode_payload(cname, clayout, data, zero, uni, lengths, payload, dp):
    expect = dp * PAGE_SIZE
    if cname == "raw":
        need(len(payload) == expect, "Codec", f"raw payload {len(payload)} != {expect}")
        blob = payload
    elif cname == "zero":
        need(len(payload) == 0, "Codec", "zero codec with payload")
        blob = b""
    elif cname == "zstd":
        need(len(payload) <= expect, "Codec", "zstd payload longer than raw")
        need(payload[:4] == b"\x28\xb5\x2f\xfd", "Codec", "not a zstd frame (skippable or bad magic)")
        fp = zstandard.get_frame_parameters(payload)
        if fp.content_size != zstandard.CONTENTSIZE_UNKNOWN:
            need(fp.content_size == expect, "Codec", f"Frame_Content_Size {fp.content_size} != {expect}")
        need(fp.dict_id == 0, "Codec", "zstd dictionary")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        blob = dobj.decompress(payload)
        need(dobj.eof, "Codec", "zstd frame incomplete")
        need(not dobj.unused_data, "Codec", "bytes after zstd frame")
        need(len(blob) == expect, "Codec", f"zstd decoded {len(blob)} != {expect}")
    elif cname == "lz4":
        need(len(payload) <= expect, "Codec", "lz4 payload longer than raw")
        try:
            blob = lz4.block.decompress(payload, uncompressed_size=expect)
        except Exception as e:
            raise ProtoError("Codec", f"lz4: {e}")
        need(len(blob) == expect, "Codec", f"lz4 decoded {len(blob)} != {expect}")
    else:  # per-page
        need(sum(lengths) == len(payload), "Codec",
             f"length table sums to {sum(lengths)}, payload {len(payload)}")
        parts = []
        off = 0
        maxd = 0
        dstat = []
        for i, ln in enumerate(lengths):
            chunk = payload[off:off + ln]
            off += ln
            need(ln <= PAGE_SIZE, "Codec", f"entry {i} = {ln} > page_size")
            if ln == PAGE_SIZE:
                parts.append(chunk)
                dstat.append("raw") if cname == "delta" else None
                continue
            if cname == "delta":
                if ln == 0:
                    parts.append(bytes(PAGE_SIZE))  # unchanged; base assumed zero
                    dstat.append("unchanged")
                    continue
                pg, nrec = delta_apply(chunk, bytes(PAGE_SIZE))
                parts.append(pg)
                dstat.append(f"{nrec} rec")
            else:
                need(ln >= 1, "Codec", f"entry {i} = 0 for {cname}")
                parts.append(inflate_page(chunk, f"page {i}"))
                md = deflate_max_distance(chunk)
                maxd = max(maxd, md)
                if cname == "deflate-4k":
                    need(md <= 4096, "Codec", f"page {i} distance {md} > 4096")
        blob = b"".join(parts)
        if cname in ("deflate", "deflate-4k"):
            ENV_SIDE["_maxdist"] = maxd
        if cname == "delta":
            ENV_SIDE["_delta"] = ",".join(dstat)
    pages = {}
    off = 0
    for s, c in data:
        for i in range(c):
            pages[s + i] = blob[off:off + PAGE_SIZE]
            off += PAGE_SIZE
    for s, c in zero:
        for i in range(c):
            pages[s + i] = bytes(PAGE_SIZE)
    for s, c, b in uni:
        for i in range(c):
            pages[s + i] = bytes([b]) * PAGE_SIZE
    return pages


ENV_SIDE = {}


def d_copy(r, flags, env):
    check_flags("COPY", flags, 0x02)
    has_crc = bool(flags & 2)
    region = r.u32("region")
    rnd = r.u32("round")
    nruns = r.u16("runs")
    cflags = r.u16("copy_flags")
    need(cflags & ~1 == 0, "InvalidField", f"copy_flags {cflags:#06x}")
    need(nruns >= 1, "RunsNotCanonical", "no runs")
    runs = [(r.u64(), r.u32(), r.u64()) for _ in range(nruns)]
    crc = r.u32("crc") if has_crc else None
    r.end()
    runs_canonical(runs, "copy target",
                   touch_ok=lambda p, c: c[2] != p[2] + p[1])
    for i, (s, c, f) in enumerate(runs):
        need(f + c <= U64, "RunsNotCanonical", f"run {i} source overflows")
    targets = [(s, s + c) for s, c, f in runs]
    sources = [(f, f + c) for s, c, f in runs]
    check_disjoint(targets, sources, "copy source is a target")
    tp = sum(c for _, c, _ in runs)
    need(tp <= MAX_PAGES, "PageCount", f"{tp} target pages")
    out = {"flags": "CRC32C" if has_crc else "", "region": region, "round": rnd,
           "copy_flags": "ROUND_END" if cflags & 1 else "0",
           "runs": " ".join(f"{s}+{c}<-{f}" for s, c, f in runs), "target_pages": tp}
    out["region_check"] = check_region(env, region, targets + sources)
    if has_crc:
        calc = crc32c(env["_envelope"] + r.b[:-4])
        need(calc == crc, "ChecksumMismatch", f"crc {crc:#010x} != computed {calc:#010x}")
        out["crc"] = f"{crc:#010x} ok"
    return out


def d_eor(r, flags, env):
    check_flags("END_OF_ROUND", flags, 0)
    out = {"round": r.u32(), "frames": r.u32(), "pages": r.u64()}
    r.end()
    return out


def d_ack(r, flags, env):
    check_flags("ACK", flags, 0)
    kind = r.u8("kind")
    res = r.take(3, "reserved")
    need(res == b"\0\0\0", "InvalidField", "ACK reserved")
    value = r.u64("value")
    r.end()
    need(kind in ACK_KINDS, "BadAck", f"kind {kind}")
    return {"kind": f"{kind} {ACK_KINDS[kind]}", "value": value}


def d_device_state(r, flags, env):
    check_flags("DEVICE_STATE", flags, 0)
    inst = r.u32("instance")
    n = r.u8("name.count")
    need(n >= 1, "InvalidField", "empty section name")
    name = utf8(r.take(n, "name"), "name")
    total = r.u64("total")
    offset = r.u64("offset")
    data = r.rest()
    need(offset + len(data) <= total, "InvalidField", "offset + len(data) > total")
    need(total <= 256 << 20, "LimitExceeded", "device-state bytes")
    return {"instance": inst, "name": name, "total": total, "offset": offset,
            "data": data[:32]}


def d_complete(r, flags, env):
    check_flags("COMPLETE", flags, 0)
    out = {"final_round": r.u32(), "sections": r.u32()}
    r.end()
    return out


def d_abort(r, flags, env):
    check_flags("ABORT", flags, 0)
    rc = r.u16("reason")
    n = r.u8("message.count")
    msg = utf8(r.take(n, "message"), "message")
    r.end()
    return {"reason": f"{rc} {ABORT_REASONS.get(rc, '?')}", "message": msg}


def d_commit(r, flags, env):
    check_flags("COMMIT", flags, 0)
    out = {"final_round": r.u32()}
    r.end()
    return out


DECODERS = {0x01: d_hello, 0x02: d_welcome, 0x03: d_reject, 0x04: d_confirm, 0x05: d_ready,
            0x10: d_layout, 0x12: d_eor, 0x13: d_ack, 0x14: d_device_state,
            0x15: d_complete, 0x16: d_abort, 0x17: d_commit, 0x18: d_copy}


def decode_frame(buf, pos, env):
    ftype = buf[pos]
    handshake = 0x01 <= ftype <= 0x05
    ftype, flags, length = read_envelope(buf, pos, handshake)
    env["_envelope"] = bytes(buf[pos:pos + 8])
    body = buf[pos + 8:pos + 8 + length]
    r = R(body)
    if ftype >= 0x80:
        return f"EXTENSION {ftype:#04x}", {"length": length, "flags": flags,
                                           "skipped": bytes(body[:16])}, pos + 8 + length
    if ftype == 0x11:
        ENV_SIDE.clear()
        out, _ = d_pages(r, flags, env)
        return "PAGES", out, pos + 8 + length
    if ftype not in DECODERS:
        raise ProtoError("UnknownFrameType", f"{ftype:#04x}")
    return FRAME_NAMES[ftype], DECODERS[ftype](r, flags, env), pos + 8 + length


# ---------------------------------------------------------------- RDMA
def d_rdma(kind, buf, env):
    r = R(buf)
    if kind == "advert":
        n = r.u16("count")
        regs = []
        for _ in range(n):
            rid, rkey, addr, ln = r.u32(), r.u32(), r.u64(), r.u64()
            need(ln >= 1, "InvalidField", "advert len 0")
            need(addr + ln <= U64 + 1, "InvalidField", "advert overflow")
            regs.append((rid, rkey, addr, ln))
        r.end()
        need(len({x[0] for x in regs}) == len(regs), "InvalidField", "duplicate region")
        env["advert"] = regs
        return "RDMA ADVERT (imm 2)", {"count": n, "regions": [
            f"region={a} rkey={b:#x} addr={c:#x} len={d:#x}" for a, b, c, d in regs]}
    if kind == "done":
        seq = r.u64("seq")
        r.end()
        return "RDMA DONE (imm 4)", {"seq": seq}
    if kind == "read_pages":
        seq = r.u64("seq")
        n = r.u16("count")
        segs = [(r.u64(), r.u32()) for _ in range(n)]
        for a, l in segs:
            need(l >= 1, "InvalidField", "segment len 0")
        hdr = r.rest()
        ftype, flags, length = read_envelope(hdr + bytes(1 << 26), 0, False) \
            if len(hdr) >= 8 else read_envelope(hdr, 0, False)
        need(ftype == 0x11, "UnexpectedFrame", f"READ_PAGES carries type {ftype:#04x}")
        env["_envelope"] = hdr[:8]
        hr = R(hdr[8:])
        out, (data, zero, uni, lengths, crc, header_len) = d_pages(hr, flags, env,
                                                                   payload_external=True)
        hr.end()  # the message ends with the header
        need(out["codec"].startswith("1 "), "InvalidField", "READ_PAGES codec not raw")
        need(lengths is None, "InvalidField", "READ_PAGES with length table")
        payload_len = length - header_len
        dp = sum(c for _, c in data)
        need(payload_len == dp * PAGE_SIZE, "Codec", f"payload {payload_len} != {dp} pages")
        need(sum(l for _, l in segs) == payload_len, "InvalidField",
             f"segments sum {sum(l for _, l in segs)} != payload {payload_len}")
        seg_check = "no advert context"
        if "advert" in env:
            ok = all(any(ra <= a and a + l <= ra + rl for _, _, ra, rl in env["advert"])
                     for a, l in segs)
            seg_check = "all segments inside advertised regions" if ok else "SEGMENT OUTSIDE ADVERT"
        out.update(seq=seq, segments=" ".join(f"{a:#x}+{l:#x}" for a, l in segs),
                   envelope_length=length, payload_len=payload_len, segment_check=seg_check,
                   runs=" data=" + ",".join(f"{s}+{c}" for s, c in data))
        return "RDMA READ_PAGES (imm 1) -> PAGES header", out
    raise ProtoError("Unknown", kind)


# ---------------------------------------------------------------- main
def read_hex(path):
    toks = open(path).read().split()
    for t in toks:
        if len(t) != 2:
            raise ProtoError("HexFormat", f"token {t!r}")
    return bytes(int(t, 16) for t in toks)


def fmt(v):
    if isinstance(v, bytes):
        return repr(v)
    return str(v)


CRC_SAMPLES = ("pages_deflate_crc", "copy_crc", "copy_round_end_crc")
EXPECTED_SAMPLES = 36


def decode_all(buf):
    pos = 0
    while pos < len(buf):
        _, _, pos = decode_frame(buf, pos, {})


def flips_rejected(golden):
    """Every single-bit flip in the first 80 bytes of a CRC sample must be rejected,
    except one that turns the frame type into an extension type (0x80..=0xff)."""
    bad = 0
    for name in CRC_SAMPLES:
        buf = read_hex(os.path.join(golden, name + ".hex"))
        for i in range(min(len(buf), 80)):
            for bit in range(8):
                m = bytearray(buf)
                m[i] ^= 1 << bit
                if i == 0 and m[0] >= 0x80:
                    continue  # an extension frame now: a receiver skips it by its length
                try:
                    decode_all(bytes(m))
                except ProtoError:
                    continue
                print(f"  FAIL {name}: bit {bit} of byte {i} flipped was accepted")
                bad += 1
    print(f"flipped copies of {', '.join(CRC_SAMPLES)}: {'all rejected' if not bad else f'{bad} accepted'}")
    return bad == 0


def main():
    global GOLDEN
    if len(sys.argv) > 1:
        GOLDEN = sys.argv[1]
    files = sorted(glob.glob(os.path.join(GOLDEN, "*.hex")))
    env = {}
    # decode layout and rdma advert first so that later samples can be checked against them
    order = sorted(files, key=lambda f: (0 if "layout" in f or "advert" in f else 1, f))
    ok = bad = 0
    for f in order:
        name = os.path.basename(f)[:-4]
        try:
            buf = read_hex(f)
            print(f"== {name} ({len(buf)} bytes)")
            if name.startswith("rdma_"):
                title, out = d_rdma(name[5:], buf, env)
                print(f"  {title}")
                for k, v in out.items():
                    print(f"    {k}: {fmt(v)}")
            else:
                pos = 0
                n = 0
                while pos < len(buf):
                    title, out, pos = decode_frame(buf, pos, env)
                    n += 1
                    print(f"  frame {n}: {title} " + "(" + f"type={buf[0]:#04x}" + ")")
                    for k, v in out.items():
                        print(f"    {k}: {fmt(v)}")
            print("  RESULT: OK")
            ok += 1
        except ProtoError as e:
            print(f"  RESULT: FAIL {e}")
            bad += 1
    print(f"\n{ok} ok, {bad} failed, of {len(order)}")
    if len(order) < EXPECTED_SAMPLES:
        print(f"FAIL: {len(order)} samples in {GOLDEN}, expected at least {EXPECTED_SAMPLES}")
        bad += 1
    if not flips_rejected(GOLDEN):
        bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
