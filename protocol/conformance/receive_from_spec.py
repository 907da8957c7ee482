#!/usr/bin/python3
"""A minimal pagewire version-6 DESTINATION written from protocol/PROTOCOL.md alone.

Listens on 127.0.0.1:PORT, runs the handshake (HMAC-SHA256 pre-shared key), accepts
every channel, decodes every frame, acks as the spec requires, applies pages into a
bytearray, and after COMMIT compares the memory with an image file.

Written by a helper session that read PROTOCOL.md and no pagewire source, against
pagewire's real source; `send_into_spec.py` runs it against the `send` example (CI).
Its destination choices (`--codecs`, `--no-crc`, `--max-pages`, `--max-frame-bytes
-1` for the smallest frame limit, `--vmin/--vmax`, `--send-ext`, `--ack-frames`) are
those PROTOCOL.md leaves to a destination.

Exit code: 0 = COMMIT taken and memory equals image (or no image given);
1 = protocol violation seen / session failed; 2 = memory differs.
"""
import argparse, hashlib, hmac, os, socket, struct, sys, threading, time, zlib, collections, json, traceback

try:
    import zstandard
except ImportError:
    zstandard = None
try:
    import lz4.block as lz4block
except ImportError:
    lz4block = None
try:
    import crc32c as _crc32c_mod
    def crc32c(data, crc=0):
        return _crc32c_mod.crc32c(data, crc)
except ImportError:
    _T = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        _T.append(c)
    def crc32c(data, crc=0):
        crc ^= 0xFFFFFFFF
        t = _T
        for b in bytes(data):
            crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

# ---- code points (PROTOCOL.md tables) ----
HELLO, WELCOME, REJECT, CONFIRM, READY = 0x01, 0x02, 0x03, 0x04, 0x05
LAYOUT, PAGES, END_OF_ROUND, ACK, DEVICE_STATE, COMPLETE, ABORT, COMMIT, COPY = range(0x10, 0x19)
FNAMES = {1: 'HELLO', 2: 'WELCOME', 3: 'REJECT', 4: 'CONFIRM', 5: 'READY', 0x10: 'LAYOUT',
          0x11: 'PAGES', 0x12: 'END_OF_ROUND', 0x13: 'ACK', 0x14: 'DEVICE_STATE',
          0x15: 'COMPLETE', 0x16: 'ABORT', 0x17: 'COMMIT', 0x18: 'COPY'}
C_RAW, C_ZERO, C_ZSTD, C_LZ4, C_DEFLATE, C_DELTA, C_DEFLATE4K = 1, 2, 3, 4, 5, 6, 7
CODEC_NAMES = {1: 'raw', 2: 'zero', 3: 'zstd', 4: 'lz4', 5: 'deflate', 6: 'delta', 7: 'deflate-4k'}
PER_PAGE_CODECS = {C_DEFLATE, C_DELTA, C_DEFLATE4K}
ACK_ROUND, ACK_FRAMES, ACK_COMPLETE, ACK_COMMITTED = 1, 2, 3, 4
R_UNSUPPORTED_VERSION, R_PAGE_SIZE_MISMATCH, R_NO_COMMON_CODEC, R_AUTH_REQUIRED, R_AUTH_FAILED, \
    R_UNKNOWN_SESSION, R_BAD_CHANNEL, R_BAD_PARAMETERS, R_PROTOCOL_ERROR, R_PEER_NOT_AUTH, \
    R_ENC_REQUIRED, R_ENC_UNSUPPORTED = range(1, 13)
A_BAD_FRAME = 2
HS_LIMIT = 4096
MAGIC = b'PAGEWIRE'
U64 = 1 << 64

LOG_LOCK = threading.Lock()
T0 = time.time()
VERBOSE = False


def log(*a):
    with LOG_LOCK:
        print('[%7.3f]' % (time.time() - T0), *a, flush=True)


def vlog(*a):
    if VERBOSE:
        log(*a)


class Fail(Exception):
    """A rule of PROTOCOL.md broken by the peer: (error name, detail)."""
    def __init__(self, rule, detail=''):
        super().__init__('%s: %s' % (rule, detail))
        self.rule, self.detail = rule, detail


class Reject(Exception):
    def __init__(self, reason, message):
        super().__init__('REJECT %d %s' % (reason, message))
        self.reason, self.message = reason, message


class Reader:
    """Bounded parser over one frame body: Truncated / TrailingBytes."""
    def __init__(self, b):
        self.b, self.o = memoryview(b), 0

    def take(self, n):
        if self.o + n > len(self.b):
            raise Fail('Truncated', 'field of %d bytes at %d past body of %d' % (n, self.o, len(self.b)))
        v = self.b[self.o:self.o + n]
        self.o += n
        return v

    def u8(self): return self.take(1)[0]
    def u16(self): return struct.unpack('<H', self.take(2))[0]
    def u32(self): return struct.unpack('<I', self.take(4))[0]
    def u64(self): return struct.unpack('<Q', self.take(8))[0]

    def list_u8(self):
        n = self.u8()
        return bytes(self.take(n))

    def list_u16(self):
        n = self.u8()
        return list(struct.unpack('<%dH' % n, self.take(2 * n)))

    def rest(self):
        v = self.b[self.o:]
        self.o = len(self.b)
        return v

    def end(self):
        if self.o != len(self.b):
            raise Fail('TrailingBytes', '%d bytes left' % (len(self.b) - self.o))


def lst8(items):
    return bytes([len(items)]) + bytes(items)


def lst16(items):
    return bytes([len(items)]) + b''.join(struct.pack('<H', x) for x in items)


def frame(t, body=b'', flags=0):
    return struct.pack('<BBHI', t, flags, 0, len(body)) + body


class Conn:
    def __init__(self, sock, peer):
        self.sock, self.peer = sock, peer
        self.send_lock = threading.Lock()
        self.closed = False

    def recv_exact(self, n):
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(mv[got:], n - got)
            if k == 0:
                if got == 0:
                    return None
                raise Fail('Truncated', 'connection closed inside a frame (%d of %d bytes)' % (got, n))
            got += k
        return buf

    def read_frame(self, limit, allow_eof=False):
        env = self.recv_exact(8)
        if env is None:
            if allow_eof:
                return None
            raise Fail('Closed', 'connection closed at a frame boundary')
        t, fl, res, ln = struct.unpack('<BBHI', env)
        if res != 0:
            raise Fail('ReservedNotZero', 'envelope reserved=%#x type %#x' % (res, t))
        if 8 + ln > limit:
            raise Fail('FrameTooLarge', 'type %#x frame of %d bytes > limit %d' % (t, 8 + ln, limit))
        body = self.recv_exact(ln) if ln else bytearray()
        if body is None:
            raise Fail('Truncated', 'closed before body')
        return t, fl, ln, bytes(env), body

    def send(self, data):
        with self.send_lock:
            if self.closed:
                return
            self.sock.sendall(data)


# ------------------------------------------------------------------ session state
class Session:
    def __init__(self, args, key):
        self.args, self.key = args, key
        self.lock = threading.RLock()
        self.session_id = None
        self.channel_count = None
        self.channels = {}          # index -> ChannelState
        self.admitted = set()
        self.page_size = None
        self.max_pages = None
        self.max_frame = None
        self.codecs = None
        self.crc = None
        self.version = None
        self.layout = None          # dict: chunk_pages, regions {id: (backing, gaddr, length)}
        self.layout_key = None
        self.region_base = {}       # id -> byte offset in mem
        self.mem = None
        self.mem_base_gaddr = None
        self.pending_re = {}        # round -> list of (channel, region, runs)
        self.re_pages = collections.Counter()   # (channel, round) -> target pages recorded
        self.sections = {}          # (name, instance) -> dict
        self.whole_sections = 0
        self.section_bytes = 0
        self.complete = None        # (final_round, sections)
        self.ack_complete_sent = False
        self.committed = False
        self.failed = None
        self.done = threading.Event()
        self.stats = collections.Counter()
        self.hello_seen = []
        self.observations = []
        self.violations = []

    def fail(self, msg):
        with self.lock:
            if self.failed is None:
                self.failed = msg
            self.done.set()

    def note(self, msg):
        with self.lock:
            if msg not in self.observations:
                self.observations.append(msg)
                log('NOTE', msg)


class ChannelState:
    def __init__(self, idx, conn):
        self.idx, self.conn = idx, conn
        self.layout_seen = False
        self.open_round = None
        self.last_ended = None
        self.frames = 0
        self.pages = 0
        self.total_frames = 0
        self.pending_acks = collections.deque()
        self.last_acked = None


# ------------------------------------------------------------------ handshake
def reject_body(S, reason, msg):
    a = S.args
    return struct.pack('<HHHI', reason, a.vmin, a.vmax, S.page_size_for_reject) + lst16(a.codec_ids) + \
        lst8([1] if a.crc else []) + lst8([1] if S.key else []) + lst8(list(msg.encode()[:255]))


def parse_hello(body):
    r = Reader(body)
    h = {}
    h['magic'] = bytes(r.take(8))
    h['vmin'], h['vmax'] = r.u16(), r.u16()
    h['session'] = bytes(r.take(16))
    h['channel'], h['channel_count'] = r.u16(), r.u16()
    h['page_size'], h['max_pages'], h['max_frame'] = r.u32(), r.u32(), r.u32()
    h['nonce'] = bytes(r.take(32))
    h['codecs'] = r.list_u16()
    h['checksums'] = list(r.list_u8())
    h['auth'] = list(r.list_u8())
    r.end()
    return h


def handshake(S, conn):
    a = S.args
    S.page_size_for_reject = a.page_size_reject
    # TLS detection on the first byte
    first = conn.sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise Fail('Closed', 'no bytes')
    if first[0] == 0x16:
        conn.send(frame(REJECT, reject_body(S, R_ENC_UNSUPPORTED, 'plaintext only')))
        raise Fail('TLS', 'peer started TLS; this destination is plaintext')
    t, fl, ln, env, body = conn.read_frame(HS_LIMIT)
    if t != HELLO:
        raise Reject(R_PROTOCOL_ERROR, 'expected HELLO, got %#x' % t)
    if fl:
        raise Fail('UnknownFlags', 'HELLO flags %#x' % fl)
    h = parse_hello(body)
    vlog('HELLO received on channel %d' % h['channel'])
    S.hello_seen.append({k: (v.hex() if isinstance(v, bytes) else v) for k, v in h.items() if k != 'nonce'})
    vlog('HELLO', h)
    if h['magic'] != MAGIC:
        raise Fail('BadMagic', h['magic'].hex())
    if h['vmin'] < 1 or h['vmax'] < h['vmin']:
        raise Reject(R_BAD_PARAMETERS, 'bad version range')
    ps = h['page_size']
    if ps < 4096 or ps > 2097152 or ps & (ps - 1):
        raise Reject(R_BAD_PARAMETERS, 'page_size')
    if not (1 <= h['max_pages'] <= 65536):
        raise Reject(R_BAD_PARAMETERS, 'max_pages')
    if not (ps + 1024 <= h['max_frame'] <= 64 << 20):
        raise Reject(R_BAD_PARAMETERS, 'max_frame_bytes')
    if h['channel_count'] < 1:
        raise Reject(R_BAD_PARAMETERS, 'channel_count')
    S.page_size_for_reject = ps
    lo, hi = max(h['vmin'], a.vmin), min(h['vmax'], a.vmax)
    if lo > hi:
        raise Reject(R_UNSUPPORTED_VERSION, 'no common version')
    version = hi
    if a.expect_session is not None and h['session'] != a.expect_session:
        raise Reject(R_UNKNOWN_SESSION, 'unknown session')
    if h['channel'] >= h['channel_count']:
        raise Reject(R_BAD_CHANNEL, 'channel not below channel_count')
    if h['channel_count'] > 64:
        raise Fail('LimitExceeded', 'channels %d > 64' % h['channel_count'])
    if S.key and 1 not in h['auth']:
        raise Reject(R_AUTH_REQUIRED, 'a key is required')
    common = [c for c in h['codecs'] if c in a.codec_ids]
    common = list(dict.fromkeys(common))
    if C_RAW not in common or C_ZERO not in common:
        raise Reject(R_NO_COMMON_CODEC, 'raw and zero required')
    checksum = 1 if (a.crc and 1 in h['checksums']) else 0
    auth = 1 if S.key else 0
    max_pages = min(h['max_pages'], a.max_pages)
    mfb = a.max_frame_bytes if a.max_frame_bytes else h['max_frame']
    if a.max_frame_bytes == -1:
        mfb = ps + 1024
    max_frame = min(h['max_frame'], max(mfb, ps + 1024))
    nonce = os.urandom(32)
    welcome = struct.pack('<HIII', version, ps, max_pages, max_frame) + nonce + lst16(common) + bytes([checksum, auth])
    hello_body = bytes(body)
    if auth:
        proof_d = hmac.new(S.key, b'pagewire v1 destination proof' + hello_body + welcome, hashlib.sha256).digest()
        conn.send(frame(WELCOME, welcome + proof_d))
    else:
        conn.send(frame(WELCOME, welcome))
    vlog('WELCOME sent, %d bytes' % (8 + len(welcome) + (32 if auth else 0)))
    t, fl, ln, env, body = conn.read_frame(HS_LIMIT)
    vlog('after WELCOME got frame type %#x len %d' % (t, ln))
    if t == REJECT:
        r = Reader(body)
        reason = r.u16()
        raise Fail('PeerRejected', 'source REJECT reason %d body %s' % (reason, bytes(body).hex()))
    if t != CONFIRM:
        raise Reject(R_PROTOCOL_ERROR, 'expected CONFIRM, got %#x' % t)
    if fl:
        raise Fail('UnknownFlags', 'CONFIRM flags %#x' % fl)
    if auth:
        if ln != 32:
            raise Fail('Truncated' if ln < 32 else 'TrailingBytes', 'CONFIRM length %d' % ln)
        proof_s = hmac.new(S.key, b'pagewire v1 source proof' + hello_body + welcome, hashlib.sha256).digest()
        if not hmac.compare_digest(proof_s, bytes(body)):
            raise Reject(R_AUTH_FAILED, 'bad proof')
    elif ln != 0:
        raise Fail('TrailingBytes', 'CONFIRM not empty')
    # Did the source send anything before READY?  (it must wait for READY)
    time.sleep(a.ready_delay)
    import select
    early = b''
    if select.select([conn.sock], [], [], 0)[0]:
        early = conn.sock.recv(64, socket.MSG_PEEK)
    if early:
        S.violations.append('channel %d: source sent %d+ bytes (first type %#x) before READY was sent' %
                            (h['channel'], len(early), early[0]))
        log('VIOLATION', S.violations[-1])
    with S.lock:
        if S.session_id is None:
            S.session_id = h['session']
            S.channel_count = h['channel_count']
            S.page_size, S.max_pages, S.max_frame = ps, max_pages, max_frame
            S.codecs, S.crc, S.version = set(common), checksum, version
            log('session: version %d page_size %d max_pages %d max_frame %d codecs %s crc %d auth %d channels %d' % (
                version, ps, max_pages, max_frame, [CODEC_NAMES.get(c, c) for c in common], checksum, auth,
                S.channel_count))
        else:
            if h['session'] != S.session_id:
                raise Reject(R_UNKNOWN_SESSION, 'another session')
            if h['channel_count'] != S.channel_count:
                raise Reject(R_BAD_CHANNEL, "its channel count differs from the session's")
            if (ps, max_pages, max_frame, set(common), checksum) != (S.page_size, S.max_pages, S.max_frame, S.codecs, S.crc):
                S.note('channel %d negotiated other parameters than channel 0 (%s)' % (
                    h['channel'], (ps, max_pages, max_frame, common, checksum)))
                raise Fail('Unsupported', 'per-channel parameters differ (this minimal destination keeps one set)')
        if h['channel'] in S.admitted:
            raise Reject(R_BAD_CHANNEL, 'another channel of the session holds that index')
        S.admitted.add(h['channel'])
        ch = ChannelState(h['channel'], conn)
        S.channels[h['channel']] = ch
    out = frame(READY)
    if a.send_ext:
        out += frame(0x80 + (h['channel'] % 0x7f), b'ext-after-ready', flags=0xA5)
    conn.send(out)
    vlog('channel %d READY' % h['channel'])
    return ch


# ------------------------------------------------------------------ helpers
def check_runs(runs, name):
    prev_end = None
    for (s, c) in runs:
        if c < 1:
            raise Fail('RunsNotCanonical', '%s run count 0' % name)
        if s + c >= U64:
            raise Fail('RunsNotCanonical', '%s run overflows' % name)
        if prev_end is not None and s <= prev_end:
            raise Fail('RunsNotCanonical', '%s runs not ascending/disjoint/merged (start %d, prev end %d)' % (name, s, prev_end))
        prev_end = s + c


def check_uniform(runs):
    prev_end, prev_b = None, None
    for (s, c, b) in runs:
        if c < 1 or s + c >= U64:
            raise Fail('RunsNotCanonical', 'uniform run count/overflow')
        if b == 0:
            raise Fail('InvalidField', 'uniform byte 0')
        if prev_end is not None:
            if s < prev_end or (s == prev_end and b == prev_b):
                raise Fail('RunsNotCanonical', 'uniform runs overlap or touch with same byte')
        prev_end, prev_b = s + c, b


def disjoint_lists(*lists):
    iv = sorted((s, s + c) for l in lists for (s, c, *_r) in l)
    for i in range(1, len(iv)):
        if iv[i][0] < iv[i - 1][1]:
            raise Fail('RunsNotCanonical', 'a page in two lists (%d)' % iv[i][0])


def region_of(S, rid):
    r = S.layout['regions'].get(rid)
    if r is None:
        raise Fail('UnknownRegion', 'region %d' % rid)
    return r


def check_range(S, rid, s, c):
    _, _, length = region_of(S, rid)
    if s + c > length // S.page_size:
        raise Fail('PageOutOfRange', 'region %d pages %d+%d > %d' % (rid, s, c, length // S.page_size))


def check_affinity(S, ch, rid, s, c):
    cc = S.channel_count
    if cc == 1:
        return
    cp = S.layout['chunk_pages']
    first, last = s // cp, (s + c - 1) // cp
    for k in range(first, min(last, first + cc) + 1):
        owner = (k + rid) % cc
        if owner != ch.idx:
            raise Fail('WrongChannel', 'region %d page %d (chunk %d) belongs to channel %d, arrived on %d' % (
                rid, max(s, k * cp), k, owner, ch.idx))


def own_pages(S, idx):
    """The pages of the layout that channel idx carries (Channel affinity)."""
    cc, cp, ps = S.channel_count, S.layout['chunk_pages'], S.page_size
    n = 0
    for rid, (_, _, length) in S.layout['regions'].items():
        pages = length // ps
        chunks = -(-pages // cp)
        for k in range((idx - rid) % cc, chunks, cc):
            n += min(cp, pages - k * cp)
    return n


def check_round(S, ch, rnd):
    if S.complete is not None and rnd > S.complete[0]:
        raise Fail('RoundAfterFinal', 'round %d > final %d' % (rnd, S.complete[0]))
    if ch.open_round is not None:
        if rnd != ch.open_round:
            raise Fail('RoundMismatch', 'round %d while %d open' % (rnd, ch.open_round))
    else:
        if ch.last_ended is not None and rnd <= ch.last_ended:
            raise Fail('RoundEnded', 'round %d <= last ended %d' % (rnd, ch.last_ended))
        ch.open_round = rnd
        ch.frames = ch.pages = 0


def moff(S, rid, page):
    return S.region_base[rid] + page * S.page_size


def uleb(b, o, limit):
    v, shift, start = 0, 0, o
    while True:
        if o >= len(b):
            raise Fail('LengthMismatch', 'delta ULEB128 runs past the page entry')
        x = b[o]; o += 1
        v |= (x & 0x7f) << shift
        shift += 7
        if not x & 0x80:
            break
        if shift > 63:
            raise Fail('LengthMismatch', 'ULEB too long')
    n = o - start
    if n > 1 and b[o - 1] == 0:
        raise Fail('LengthMismatch', 'ULEB128 longer than needed')
    if v > limit:
        raise Fail('LengthMismatch', 'ULEB value %d > page_size' % v)
    return v, o


def apply_delta(S, off, d):
    ps = S.page_size
    pos, o, first = 0, 0, True
    mem = S.mem
    while o < len(d):
        skip, o = uleb(d, o, ps)
        ln, o = uleb(d, o, ps)
        if ln < 1:
            raise Fail('LengthMismatch', 'delta record len 0')
        if skip == 0 and not first:
            raise Fail('LengthMismatch', 'delta skip 0 on a record after the first')
        first = False
        pos += skip
        if pos + ln > ps or o + ln > len(d):
            raise Fail('LengthMismatch', 'delta passes page_size or entry')
        mem[off + pos: off + pos + ln] = d[o:o + ln]
        pos += ln
        o += ln


# ------------------------------------------------------------------ frames
def on_layout(S, ch, fl, body):
    if fl:
        raise Fail('UnknownFlags', 'LAYOUT flags %#x' % fl)
    r = Reader(body)
    count = r.u32()
    cp = r.u32()
    rest = len(body) - 8
    if count * 24 > rest:
        raise Fail('Truncated', 'LAYOUT count %d' % count)
    if count * 24 < rest:
        raise Fail('TrailingBytes', 'LAYOUT count %d' % count)
    if cp == 0:
        raise Fail('InvalidField', 'chunk_pages 0')
    ps = S.page_size
    regs = []
    for _ in range(count):
        rid, bps, ga, ln = r.u32(), r.u32(), r.u64(), r.u64()
        if ln == 0 or ga % ps or ln % ps or ga + ln >= U64 or bps < ps or bps & (bps - 1):
            raise Fail('InvalidField', 'region %d fields' % rid)
        regs.append((rid, bps, ga, ln))
    r.end()
    if count > 256:
        raise Fail('LimitExceeded', 'regions %d > 256' % count)
    key = (cp, tuple(sorted(regs)))
    with S.lock:
        if S.complete is not None:
            raise Fail('AfterCommit' if S.committed else 'AfterComplete', 'LAYOUT after COMPLETE')
        if S.layout is None:
            ids = [x[0] for x in regs]
            if len(set(ids)) != len(ids):
                raise Fail('LayoutConflict', 'duplicate region id')
            srt = sorted(regs, key=lambda x: x[2])
            for i in range(1, len(srt)):
                if srt[i][2] < srt[i - 1][2] + srt[i - 1][3]:
                    raise Fail('LayoutConflict', 'overlap')
            total = sum(x[3] for x in regs)
            if total > S.args.mem_limit:
                raise Fail('LimitExceeded', 'guest memory %d > %d' % (total, S.args.mem_limit))
            S.layout = {'chunk_pages': cp, 'regions': {x[0]: (x[1], x[2], x[3]) for x in regs}}
            S.layout_key = key
            base = 0
            for x in srt:
                S.region_base[x[0]] = base
                base += x[3]
            S.mem = bytearray(total)
            S.layout_pages = total // ps
            S.mem_regions = srt
            log('LAYOUT chunk_pages %d regions %s' % (cp, [(x[0], x[1], hex(x[2]), x[3]) for x in regs]))
        elif key != S.layout_key:
            raise Fail('LayoutDiffers', 'channel %d LAYOUT differs' % ch.idx)
    ch.layout_seen = True


def on_pages(S, ch, fl, env, body):
    if fl & ~3:
        raise Fail('UnknownFlags', 'PAGES flags %#x' % fl)
    per_page, has_crc = bool(fl & 1), bool(fl & 2)
    r = Reader(body)
    codec, nuni, rid, rnd, ndata, nzero = r.u16(), r.u16(), r.u32(), r.u32(), r.u16(), r.u16()
    data = [(r.u64(), r.u32()) for _ in range(ndata)]
    zero = [(r.u64(), r.u32()) for _ in range(nzero)]
    uni = [(r.u64(), r.u32(), r.u8()) for _ in range(nuni)]
    check_runs(data, 'data')
    check_runs(zero, 'zero')
    check_uniform(uni)
    disjoint_lists(data, zero, uni)
    dp = sum(c for _, c in data)
    zp = sum(c for _, c in zero)
    up = sum(c for _, c, _ in uni)
    tot = dp + zp + up
    if not (1 <= tot <= S.max_pages):
        raise Fail('PageCount', '%d pages (max_pages %d)' % (tot, S.max_pages))
    if codec not in S.codecs:
        raise Fail('CodecNotNegotiated', 'codec %d' % codec)
    if per_page != (codec in PER_PAGE_CODECS):
        raise Fail('LayoutMismatch', 'codec %d PER_PAGE=%d' % (codec, per_page))
    if (codec == C_ZERO) != (ndata == 0):
        raise Fail('InvalidField', 'codec zero <=> no data runs (codec %d, %d data runs)' % (codec, ndata))
    lengths = None
    if per_page:
        lengths = struct.unpack('<%dI' % dp, r.take(4 * dp))
    crc = None
    if has_crc:
        crc = r.u32()
    if S.crc and not has_crc:
        raise Fail('ChecksumMissing', 'PAGES without CRC')
    if not S.crc and has_crc:
        raise Fail('ChecksumNotNegotiated', 'PAGES with CRC')
    hdr_len = r.o
    payload = r.rest()
    with S.lock:
        for (s, c, *_x) in data + zero + uni:
            check_range(S, rid, s, c)
        for (s, c, *_x) in data + zero + uni:
            check_affinity(S, ch, rid, s, c)
        check_round(S, ch, rnd)
    if has_crc:
        got = crc32c(payload, crc32c(bytes(body[:hdr_len - 4]), crc32c(env)))
        if got != crc:
            raise Fail('ChecksumMismatch', 'PAGES crc %08x computed %08x' % (crc, got))
    ps = S.page_size
    n = dp * ps
    # decode
    if codec == C_ZERO:
        if len(payload):
            raise Fail('LengthMismatch', 'zero codec with payload')
        block = None
    elif codec == C_RAW:
        if len(payload) != n:
            raise Fail('LengthMismatch', 'raw payload %d != %d' % (len(payload), n))
        block = payload
    elif codec in (C_ZSTD, C_LZ4):
        if not (1 <= len(payload) <= n):
            raise Fail('LengthMismatch', 'block payload %d not in 1..=%d' % (len(payload), n))
        if codec == C_ZSTD:
            if bytes(payload[:4]) != b'\x28\xb5\x2f\xfd':
                raise Fail('LengthMismatch', 'not a zstd frame (magic %s)' % bytes(payload[:4]).hex())
            try:
                fcs = zstandard.frame_content_size(bytes(payload))
            except zstandard.ZstdError as e:
                raise Fail('LengthMismatch', 'zstd frame header: %s' % e)
            if fcs is None:
                fcs = -1
            if fcs not in (-1, n):
                raise Fail('LengthMismatch', 'zstd Frame_Content_Size %d != %d' % (fcs, n))
            if fcs == -1:
                S.stats['zstd frames without FCS'] += 1
            d = zstandard.ZstdDecompressor().decompressobj()
            try:
                block = d.decompress(bytes(payload))
            except zstandard.ZstdError as e:
                raise Fail('LengthMismatch', 'zstd: %s' % e)
            if not d.eof or d.unused_data:
                raise Fail('LengthMismatch', 'zstd frame incomplete or bytes after it')
        else:
            try:
                block = lz4block.decompress(bytes(payload), uncompressed_size=n)
            except Exception as e:
                raise Fail('LengthMismatch', 'lz4: %s' % e)
        if len(block) != n:
            raise Fail('LengthMismatch', 'decoded %d != %d' % (len(block), n))
    elif codec in (C_DEFLATE, C_DEFLATE4K, C_DELTA):
        if sum(lengths) != len(payload):
            raise Fail('LengthMismatch', 'table sum %d != payload %d' % (sum(lengths), len(payload)))
        for e in lengths:
            if e > ps or (e == 0 and codec != C_DELTA):
                raise Fail('InvalidField', 'table entry %d' % e)
        block = None
    else:
        raise Fail('CodecNotNegotiated', 'codec %d' % codec)
    S.stats['PAGES codec=%s%s' % (CODEC_NAMES.get(codec, codec), ' +crc' if has_crc else '')] += 1
    if uni:
        S.stats['PAGES with uniform runs'] += 1
    S.stats['data pages'] += dp
    S.stats['zero pages'] += zp
    S.stats['uniform pages'] += up
    mem = S.mem
    with S.lock:   # exclusive against ROUND_END application
        if codec in (C_RAW, C_ZSTD, C_LZ4):
            bo = 0
            for (s, c) in data:
                o = moff(S, rid, s)
                mem[o:o + c * ps] = block[bo:bo + c * ps]
                bo += c * ps
        elif codec in (C_DEFLATE, C_DEFLATE4K, C_DELTA):
            po, i = 0, 0
            for (s, c) in data:
                for p in range(s, s + c):
                    e = lengths[i]; i += 1
                    chunk = payload[po:po + e]; po += e
                    o = moff(S, rid, p)
                    if e == ps:
                        mem[o:o + ps] = chunk
                        S.stats['per-page raw entries'] += 1
                    elif codec == C_DELTA:
                        if e == 0:
                            S.stats['delta unchanged entries'] += 1
                            continue
                        apply_delta(S, o, bytes(chunk))
                        S.stats['delta entries'] += 1
                    else:
                        d = zlib.decompressobj(-15)
                        try:
                            out = d.decompress(bytes(chunk), ps + 1)
                        except zlib.error as ex:
                            raise Fail('LengthMismatch', 'inflate: %s' % ex)
                        if len(out) != ps or not d.eof or d.unused_data or d.unconsumed_tail:
                            raise Fail('LengthMismatch', 'inflate page %d: %d bytes eof=%s unused=%d' % (
                                p, len(out), d.eof, len(d.unused_data)))
                        mem[o:o + ps] = out
        for (s, c) in zero:
            o = moff(S, rid, s)
            mem[o:o + c * ps] = bytes(c * ps)
        for (s, c, b) in uni:
            o = moff(S, rid, s)
            mem[o:o + c * ps] = bytes([b]) * (c * ps)
        ch.frames += 1
        ch.pages += tot
        ch.total_frames += 1


def on_copy(S, ch, fl, env, body):
    if fl & ~2:
        raise Fail('UnknownFlags', 'COPY flags %#x' % fl)
    has_crc = bool(fl & 2)
    r = Reader(body)
    rid, rnd, nruns, cflags = r.u32(), r.u32(), r.u16(), r.u16()
    runs = [(r.u64(), r.u32(), r.u64()) for _ in range(nruns)]
    crc = r.u32() if has_crc else None
    r.end()
    if cflags & ~1:
        raise Fail('InvalidField', 'copy_flags %#x' % cflags)
    round_end = bool(cflags & 1)
    if S.crc and not has_crc:
        raise Fail('ChecksumMissing', 'COPY')
    if not S.crc and has_crc:
        raise Fail('ChecksumNotNegotiated', 'COPY')
    if nruns < 1:
        raise Fail('RunsNotCanonical', 'COPY with 0 runs')
    prev = None
    for (s, c, f) in runs:
        if c < 1 or s + c >= U64 or f + c >= U64:
            raise Fail('RunsNotCanonical', 'COPY run count/overflow')
        if prev is not None:
            ps_, pc, pf = prev
            if s < ps_ + pc:
                raise Fail('RunsNotCanonical', 'COPY targets not ascending/disjoint')
            if s == ps_ + pc and f == pf + pc:
                raise Fail('RunsNotCanonical', 'COPY touching runs whose sources continue')
        prev = (s, c, f)
    import bisect
    tgt = sorted((s, s + c) for s, c, f in runs)
    ends = [b for a_, b in tgt]
    for (s, c, f) in runs:
        j = bisect.bisect_right(ends, f)
        if j < len(tgt) and tgt[j][0] < f + c:
            raise Fail('RunsNotCanonical', 'COPY source page %d is a target of the same frame' % max(f, tgt[j][0]))
    tp = sum(c for _, c, _ in runs)
    if tp > S.max_pages:
        raise Fail('PageCount', 'COPY %d target pages > %d' % (tp, S.max_pages))
    if has_crc:
        got = crc32c(bytes(body[:len(body) - 4]), crc32c(env))
        if got != crc:
            raise Fail('ChecksumMismatch', 'COPY crc %08x computed %08x' % (crc, got))
    ps = S.page_size
    with S.lock:
        for (s, c, f) in runs:
            check_range(S, rid, s, c)
            check_range(S, rid, f, c)
        for (s, c, f) in runs:
            check_affinity(S, ch, rid, s, c)
            if not round_end:
                check_affinity(S, ch, rid, f, c)
        check_round(S, ch, rnd)
        if round_end:
            k = (ch.idx, rnd)
            own = own_pages(S, ch.idx)
            if S.re_pages[k] + tp > own:
                raise Fail('LimitExceeded', 'RoundEndPages %d > %d' % (S.re_pages[k] + tp, own))
            S.re_pages[k] += tp
            S.pending_re.setdefault(rnd, []).append((ch.idx, rid, runs))
            S.stats['COPY ROUND_END%s' % (' +crc' if has_crc else '')] += 1
            S.stats['COPY ROUND_END target pages'] += tp
            # record whether any source belongs to another channel (allowed)
            if S.channel_count > 1:
                cp = S.layout['chunk_pages']
                for (s, c, f) in runs:
                    if any(((k2 + rid) % S.channel_count) != ch.idx for k2 in range(f // cp, (f + c - 1) // cp + 1)):
                        S.stats['COPY ROUND_END with foreign sources'] += 1
                        break
        else:
            mem = S.mem
            srcs = [bytes(mem[moff(S, rid, f): moff(S, rid, f) + c * ps]) for (s, c, f) in runs]
            for (s, c, f), b in zip(runs, srcs):
                o = moff(S, rid, s)
                mem[o:o + c * ps] = b
            S.stats['COPY%s' % (' +crc' if has_crc else '')] += 1
            S.stats['COPY target pages'] += tp
        ch.frames += 1
        ch.pages += tp
        ch.total_frames += 1


def progress(S):
    """Under S.lock: apply ROUND_END copies that are due, send ACK ROUNDs and ACK COMPLETE."""
    cc = S.channel_count
    ended = [S.channels[c].last_ended if c in S.channels else None for c in range(cc)]
    min_ended = None if any(e is None for e in ended) else min(ended)
    if min_ended is not None:
        for rnd in sorted(S.pending_re):
            if rnd > min_ended:
                break
            ps = S.page_size
            mem = S.mem
            items = S.pending_re.pop(rnd)
            # read all sources first, then write (the spec leaves conflicts unspecified anyway)
            staged = []
            for (c, rid, runs) in items:
                for (s, n, f) in runs:
                    o = moff(S, rid, f)
                    staged.append((moff(S, rid, s), bytes(mem[o:o + n * ps])))
            for o, b in staged:
                mem[o:o + len(b)] = b
            vlog('applied %d ROUND_END copies of round %d' % (len(items), rnd))
    for c, chs in S.channels.items():
        while chs.pending_acks:
            r = chs.pending_acks[0]
            if any(rr <= r and any(x[0] == c for x in items) for rr, items in S.pending_re.items()):
                break
            chs.pending_acks.popleft()
            send_ack(S, chs, ACK_ROUND, r)
    if S.complete is not None and not S.ack_complete_sent:
        fr, nsec = S.complete
        if all(S.channels.get(c) is not None and S.channels[c].last_ended == fr and S.channels[c].open_round is None
               for c in range(cc)) and not S.pending_re and \
                not any(not s['whole'] for s in S.sections.values()) and S.whole_sections == nsec:
            S.ack_complete_sent = True
            send_ack(S, S.channels[0], ACK_COMPLETE, fr)
            log('ACK COMPLETE %d sent' % fr)


def send_ack(S, ch, kind, value):
    out = frame(ACK, struct.pack('<B3sQ', kind, b'\0\0\0', value))
    if S.args.send_ext:
        out = frame(0xfe, b'x' * 7, flags=0x01) + out
    try:
        ch.conn.send(out)
    except OSError as e:
        log('send ACK failed on channel %d: %s' % (ch.idx, e))
    S.stats['ACK sent kind %d' % kind] += 1


def on_end_of_round(S, ch, fl, body):
    if fl:
        raise Fail('UnknownFlags', 'END_OF_ROUND flags %#x' % fl)
    r = Reader(body)
    rnd, frames, pages = r.u32(), r.u32(), r.u64()
    r.end()
    with S.lock:
        if S.complete is not None and rnd > S.complete[0]:
            raise Fail('RoundAfterFinal', 'END_OF_ROUND %d > final %d' % (rnd, S.complete[0]))
        if ch.last_ended is not None and rnd <= ch.last_ended:
            raise Fail('EndOfRoundOutOfOrder', 'round %d <= last ended %d' % (rnd, ch.last_ended))
        if ch.open_round is not None and rnd != ch.open_round:
            raise Fail('EndOfRoundOutOfOrder', 'round %d while %d open' % (rnd, ch.open_round))
        if ch.open_round is None:
            ch.frames = ch.pages = 0
            S.stats['empty rounds'] += 1
        if (frames, pages) != (ch.frames, ch.pages):
            raise Fail('CountMismatch', 'channel %d round %d: END_OF_ROUND says %d frames %d pages, received %d frames %d pages' % (
                ch.idx, rnd, frames, pages, ch.frames, ch.pages))
        ch.last_ended = rnd
        ch.open_round = None
        ch.frames = ch.pages = 0
        S.stats['END_OF_ROUND'] += 1
        S.rounds_seen = getattr(S, 'rounds_seen', set()) | {rnd}
        ch.pending_acks.append(rnd)
        progress(S)


def on_device_state(S, ch, fl, body):
    if fl:
        raise Fail('UnknownFlags', 'DEVICE_STATE flags %#x' % fl)
    r = Reader(body)
    inst = r.u32()
    name = r.list_u8()
    total, off = r.u64(), r.u64()
    data = r.rest()
    if not (1 <= len(name) <= 255):
        raise Fail('InvalidField', 'section name length %d' % len(name))
    try:
        name_s = name.decode('utf-8')
    except UnicodeDecodeError:
        raise Fail('InvalidField', 'section name not UTF-8')
    if off + len(data) > total:
        raise Fail('InvalidField', 'offset+len > total')
    with S.lock:
        if S.ack_complete_sent:
            raise Fail('AfterComplete', 'DEVICE_STATE after the session is complete')
        if ch.idx == 0 and S.complete is not None:
            raise Fail('AfterComplete', 'DEVICE_STATE on channel 0 after COMPLETE')
        k = (name_s, inst)
        sec = S.sections.get(k)
        if sec is None:
            if off != 0:
                raise Fail('DeviceStateOutOfOrder', 'first chunk offset %d' % off)
            if len(S.sections) + 1 > 4096:
                raise Fail('LimitExceeded', 'sections')
            if S.section_bytes + total > 256 << 20:
                raise Fail('LimitExceeded', 'device-state bytes')
            S.section_bytes += total
            sec = S.sections[k] = {'channel': ch.idx, 'total': total, 'got': 0, 'whole': False, 'data': bytearray()}
        else:
            if sec['whole']:
                raise Fail('DuplicateSection', str(k))
            if sec['channel'] != ch.idx:
                raise Fail('SectionChannel', str(k))
            if sec['total'] != total or sec['got'] != off:
                raise Fail('DeviceStateOutOfOrder', '%s total %d off %d, expected total %d off %d' % (
                    k, total, off, sec['total'], sec['got']))
        sec['data'] += data
        sec['got'] += len(data)
        S.stats['DEVICE_STATE chunks'] += 1
        if sec['got'] == total:
            sec['whole'] = True
            S.whole_sections += 1
            vlog('section %s whole (%d bytes)' % (k, total))
            if S.complete is not None and S.whole_sections > S.complete[1]:
                raise Fail('SectionCount', 'more sections than announced')
        progress(S)


def on_complete(S, ch, fl, body):
    if fl:
        raise Fail('UnknownFlags', 'COMPLETE flags %#x' % fl)
    r = Reader(body)
    fr, nsec = r.u32(), r.u32()
    r.end()
    with S.lock:
        if ch.idx != 0:
            raise Fail('CompleteChannel', 'COMPLETE on channel %d' % ch.idx)
        if S.complete is not None:
            raise Fail('AfterComplete', 'second COMPLETE')
        if ch.last_ended != fr or ch.open_round is not None:
            raise Fail('CompleteEarly', 'channel 0 last ended %s open %s, final %d' % (ch.last_ended, ch.open_round, fr))
        for c in S.channels.values():
            if (c.last_ended is not None and c.last_ended > fr) or (c.open_round is not None and c.open_round > fr):
                raise Fail('RoundAfterFinal', 'channel %d beyond final round' % c.idx)
        if S.whole_sections > nsec:
            raise Fail('SectionCount', '%d whole > %d' % (S.whole_sections, nsec))
        for k, s in S.sections.items():
            if not s['whole'] and s['channel'] == 0:
                raise Fail('CompleteEarly', 'section %s unfinished on channel 0' % (k,))
        if S.channel_count == 1 and S.whole_sections != nsec:
            raise Fail('CompleteEarly', 'one channel and sections missing')
        S.complete = (fr, nsec)
        log('COMPLETE final_round %d sections %d' % (fr, nsec))
        progress(S)


def on_commit(S, ch, fl, body):
    if fl:
        raise Fail('UnknownFlags', 'COMMIT flags %#x' % fl)
    r = Reader(body)
    fr = r.u32()
    r.end()
    with S.lock:
        if ch.idx != 0:
            raise Fail('CommitChannel', 'channel %d' % ch.idx)
        if S.committed:
            raise Fail('AfterCommit', 'second COMMIT')
        if not S.ack_complete_sent:
            raise Fail('CommitEarly', 'before ACK COMPLETE')
        if fr != S.complete[0]:
            raise Fail('CommitMismatch', '%d != %d' % (fr, S.complete[0]))
        S.committed = True
        log('COMMIT %d taken: destination owns the guest' % fr)
    send_ack(S, ch, ACK_COMMITTED, fr)
    S.done.set()


def session_loop(S, ch):
    conn = ch.conn
    while True:
        try:
            fr = conn.read_frame(S.max_frame, allow_eof=True)
        except socket.timeout:
            raise Fail('IdleTimeout', 'channel %d idle' % ch.idx)
        if fr is None:
            with S.lock:
                if S.committed:
                    return
                # a close at a frame boundary before COMMIT: the session fails (unless other
                # channels may legitimately be done: non-zero channels after their final round)
                if ch.idx != 0 and ch.open_round is None:
                    S.note('source closed channel %d (no round open, last ended %s) before ACK COMMITTED; complete=%s' % (
                        ch.idx, ch.last_ended, S.complete is not None))
                    return
            raise Fail('Closed', 'channel %d closed before COMMIT (last ended %s)' % (ch.idx, ch.last_ended))
        t, fl, ln, env, body = fr
        S.stats['frames type %s' % FNAMES.get(t, hex(t))] += 1
        if t >= 0x80:
            S.stats['extension frames'] += 1
            continue
        if S.committed:
            if t == ABORT:
                log('ABORT after COMMIT (ignored)')
                continue
            raise Fail('AfterCommit', 'frame %s after COMMIT' % FNAMES.get(t, hex(t)))
        if t == ABORT:
            rr = Reader(body)
            reason = rr.u16()
            msg = rr.list_u8()
            raise Fail('PeerAborted', 'reason %d %r' % (reason, msg))
        if t in (HELLO, WELCOME, REJECT, CONFIRM, READY):
            raise Fail('UnexpectedFrame', '%s after READY' % FNAMES[t])
        if t not in FNAMES or t == ACK:
            raise Fail('UnknownFrameType' if t not in FNAMES else 'UnexpectedFrame', 'type %#x' % t)
        if not ch.layout_seen and t != LAYOUT:
            raise Fail('LayoutMissing', '%s before LAYOUT on channel %d' % (FNAMES[t], ch.idx))
        if ch.idx == 0 and S.complete is not None and t != COMMIT:
            raise Fail('AfterComplete', '%s on channel 0 after COMPLETE' % FNAMES[t])
        if S.ack_complete_sent and t in (PAGES, COPY, DEVICE_STATE):
            raise Fail('AfterComplete', '%s after the session is complete' % FNAMES[t])
        if t == LAYOUT:
            on_layout(S, ch, fl, body)
        elif t == PAGES:
            on_pages(S, ch, fl, env, body)
        elif t == COPY:
            on_copy(S, ch, fl, env, body)
        elif t == END_OF_ROUND:
            on_end_of_round(S, ch, fl, body)
        elif t == DEVICE_STATE:
            on_device_state(S, ch, fl, body)
        elif t == COMPLETE:
            on_complete(S, ch, fl, body)
        elif t == COMMIT:
            on_commit(S, ch, fl, body)
            return
        if S.args.ack_frames and t in (PAGES, COPY):
            with S.lock:
                send_ack(S, ch, ACK_FRAMES, ch.total_frames)


def channel_thread(S, sock, peer):
    conn = Conn(sock, peer)
    sock.settimeout(S.args.idle_timeout)
    ch = None
    try:
        try:
            ch = handshake(S, conn)
        except Reject as rj:
            log('REJECT to %s: %d %s' % (peer, rj.reason, rj.message))
            try:
                conn.send(frame(REJECT, reject_body(S, rj.reason, rj.message)))
            except OSError:
                pass
            S.violations.append('handshake refused: REJECT %d %s' % (rj.reason, rj.message)) if not S.args.expect_reject else None
            S.stats['REJECT sent %d' % rj.reason] += 1
            if S.args.expect_reject:
                S.done.set()
            return
        session_loop(S, ch)
    except Fail as f:
        if S.committed and f.rule in ('Closed',):
            return
        msg = 'channel %s: %s: %s' % (ch.idx if ch else '?', f.rule, f.detail)
        log('FAIL', msg)
        S.violations.append(msg)
        try:
            body = struct.pack('<H', A_BAD_FRAME) + lst8(list(('%s: %s' % (f.rule, f.detail)).encode()[:255]))
            conn.send(frame(ABORT, body))
        except OSError:
            pass
        S.fail(msg)
    except (OSError, ConnectionError) as e:
        if not S.committed:
            msg = 'channel %s: I/O error %s' % (ch.idx if ch else '?', e)
            log(msg)
            S.fail(msg)
    except Exception as e:
        traceback.print_exc()
        S.fail('internal error: %r' % e)
    finally:
        if S.committed or S.failed:
            pass
        # leave the socket to be closed by main after the session ends


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--port', type=int, default=0)
    ap.add_argument('--port-file', help='write the chosen port here')
    ap.add_argument('--key-file', help='pre-shared key file (one trailing \\n or \\r\\n ignored)')
    ap.add_argument('--image', help='image to compare guest memory with after COMMIT')
    ap.add_argument('--codecs', default='raw,zero,zstd,lz4,deflate,delta,deflate-4k',
                    help='codecs this destination lists (raw and zero always)')
    ap.add_argument('--no-crc', action='store_true', help='do not offer crc32c')
    ap.add_argument('--max-pages', type=int, default=65536)
    ap.add_argument('--max-frame-bytes', type=int, default=0, help='0: accept the source\'s; -1: page_size+1024 (minimum)')
    ap.add_argument('--vmin', type=int, default=6)
    ap.add_argument('--vmax', type=int, default=6)
    ap.add_argument('--expect-session', help='hex session id to require')
    ap.add_argument('--expect-reject', action='store_true', help='a REJECT by us is the expected outcome')
    ap.add_argument('--send-ext', action='store_true', help='send extension frames after READY and before each ACK')
    ap.add_argument('--ack-frames', action='store_true', help='also send ACK FRAMES after each PAGES/COPY')
    ap.add_argument('--ready-delay', type=float, default=0.02)
    ap.add_argument('--idle-timeout', type=float, default=60)
    ap.add_argument('--mem-limit', type=int, default=16 << 30)
    ap.add_argument('--page-size-reject', type=int, default=4096)
    ap.add_argument('--json', help='write a JSON summary')
    ap.add_argument('-v', '--verbose', action='store_true')
    a = ap.parse_args()
    global VERBOSE
    VERBOSE = a.verbose
    names = {v: k for k, v in CODEC_NAMES.items()}
    a.codec_ids = sorted(set([C_RAW, C_ZERO] + [names[x] for x in a.codecs.split(',') if x]))
    a.crc = not a.no_crc
    a.expect_session = bytes.fromhex(a.expect_session) if a.expect_session else None
    key = None
    if a.key_file:
        key = open(a.key_file, 'rb').read()
        if key.endswith(b'\n'):
            key = key[:-1]
            if key.endswith(b'\r'):
                key = key[:-1]
        if len(key) < 16:
            sys.exit('key shorter than 16 bytes')
    S = Session(a, key)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(('127.0.0.1', a.port))
    srv.listen(64)
    port = srv.getsockname()[1]
    if a.port_file:
        with open(a.port_file + '.tmp', 'w') as f:
            f.write(str(port))
        os.rename(a.port_file + '.tmp', a.port_file)
    log('listening on 127.0.0.1:%d codecs %s crc %s max_pages %d max_frame %s versions %d..=%d' % (
        port, [CODEC_NAMES[c] for c in a.codec_ids], a.crc, a.max_pages, a.max_frame_bytes, a.vmin, a.vmax))
    socks = []

    def acceptor():
        while not S.done.is_set():
            try:
                srv.settimeout(0.5)
                s, peer = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
            threading.Thread(target=channel_thread, args=(S, s, peer), daemon=True).start()
    threading.Thread(target=acceptor, daemon=True).start()
    S.done.wait()
    time.sleep(0.2)
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
    srv.close()
    rc = 0
    result = {'committed': S.committed, 'failed': S.failed, 'violations': S.violations,
              'stats': dict(S.stats), 'hello': S.hello_seen[:1], 'notes': S.observations,
              'rounds': sorted(getattr(S, 'rounds_seen', set()))}
    if S.sections:
        result['sections'] = {'%s#%d' % k: v['total'] for k, v in S.sections.items()}
    if S.failed or not S.committed or S.violations:
        rc = 1
    if S.committed and a.image:
        img = open(a.image, 'rb').read()
        mem = bytes(S.mem)
        result['mem_bytes'] = len(mem)
        result['image_bytes'] = len(img)
        if img == mem:
            result['memory_equal'] = True
        else:
            result['memory_equal'] = False
            ps = S.page_size
            diff = [i for i in range(0, min(len(img), len(mem)), ps) if img[i:i + ps] != mem[i:i + ps]]
            result['pages_differing'] = len(diff)
            result['first_differing_pages'] = diff[:8]
            if rc == 0:
                rc = 2
    log('RESULT', json.dumps(result, indent=1, sort_keys=True))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(result, f, indent=1, sort_keys=True)
    if rc == 0:
        print('OK: memory equals image' if result.get('memory_equal') else
              'OK', flush=True)
    else:
        print('NOT OK (rc=%d)' % rc, flush=True)
    sys.exit(rc)


if __name__ == '__main__':
    main()
