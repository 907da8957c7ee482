#!/usr/bin/env python3
"""A hostile but authenticated source against the real destination process: the
source written from PROTOCOL.md alone (source_from_spec.py) completes the handshake
with the key, then alters a few of the frames it sends after READY, and this script
checks how the `receive` example takes them.

    python3 protocol/conformance/mutate_receive.py RECEIVE_BINARY \\
        [--iterations N] [--seconds S] [--seed SEED] [--iteration I] [--transport uring]

Each iteration starts a fresh receiver and runs one of source_from_spec.py's
migrations (2 channels with CRC32C, 1 without a checksum, 4 with CRC32C, and 2 without
a checksum, whose changed frames reach the rules across channels), with one to
three of its frames changed at random: bits flipped anywhere (envelope included), a
field of 1, 2, 4 or 8 bytes overwritten with a boundary value, the frame cut short,
dropped, sent twice, held back behind the next one, sent on another channel, given
another type, or preceded by an injected frame (an earlier frame replayed, or a frame
of a random type and body).

What the receiver must do, whatever it is sent (else this script fails):
- exit by itself within 10 s of the source closing its connections, with status 0 or
  1 and a last line of JSON with "status" "completed" or "failed" (no panic, no
  signal, no hang);
- in the runs with CRC32C, never report "completed" when a bit of a PAGES or COPY
  frame was changed (every byte of those frames is under the checksum);
- stay under 512 MiB of memory (the layout's limit is set to 64 MiB).

A receiver may complete a run whose changes it cannot see (frames reordered within a
round, a changed payload without a checksum); that is not a failure.
`--transport uring` runs the receiver with its channels read through io_uring.
Prints the seed; `--seed SEED --iteration I` replays one iteration. Loopback only;
every iteration ends within about 20 s.
"""
import json
import os
import random
import resource
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import source_from_spec as spec  # noqa: E402

RUNS = ((2, 2, True), (1, 1, False), (4, 4, True), (2, 2, False))
OPS = ("flip", "field", "truncate", "drop", "dup", "hold", "other-channel", "retype", "inject")
BOUNDARY = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 4096, 65536, 0x7FFFFFFF,
            0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 63, (1 << 64) - 1)
GRACE, MAX_RSS_KIB = 10, 512 << 10
CHECKED = (spec.T_PAGES, spec.T_COPY)  # frames every byte of which CRC32C covers


class Tamper:
    """Channel.tamper: counts the frames sent after READY and changes those at `at`."""

    def __init__(self, rng, at):
        self.rng, self.at, self.n = rng, set(at), 0
        self.chans, self.held, self.history, self.done = {}, {}, [], []

    def __call__(self, ch, frame):
        self.chans[ch.idx] = ch
        out = [frame]
        if self.n in self.at:
            out = self.change(ch, frame)
        self.n += 1
        self.history.append(frame)
        if ch.idx in self.held and self.held[ch.idx] is not frame:
            out.append(self.held.pop(ch.idx))
        return out

    def change(self, ch, frame):
        rng, b = self.rng, bytearray(frame)
        op = rng.choice(OPS)
        if op == "flip":
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == "field":
            width = rng.choice((1, 2, 4, 8))
            at = rng.randrange(max(1, len(b) - width + 1))
            v = rng.choice(BOUNDARY) if rng.random() < 0.8 else rng.getrandbits(64)
            v = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            b[at:at + width] = v[:len(b) - at]
        elif op == "truncate":
            b = b[:rng.randrange(len(b))]
        elif op == "retype":
            b[0] = rng.choice([t for t in range(0x01, 0x19) if t != b[0]] + [0x80, 0xFF])
        changed = op in ("flip", "field", "retype") and bytes(b) != frame
        self.done.append((self.n, op, frame[0], len(frame), changed))
        if op == "drop":
            return []
        if op == "dup":
            return [frame, frame]
        if op == "hold":
            self.held[ch.idx] = frame
            return []
        if op == "other-channel":
            others = [c for i, c in self.chans.items() if i != ch.idx]
            if others:
                rng.choice(others).s.sendall(frame)
                return []
            return [frame]
        if op == "inject":
            if self.history and rng.random() < 0.5:
                extra = rng.choice(self.history)
            else:
                t = rng.choice(list(range(0x10, 0x19)) + [0x80, rng.randrange(256)])
                body = rng.randbytes(rng.choice((0, 4, 8, 12, 16, 24, 40, rng.randrange(300))))
                extra = spec.env(t, rng.choice((0, 0, 1, 2, 3, 0xFF)), body)
            return [extra, frame]
        return [bytes(b)]

    def crc_must_fail(self, crc):
        """With CRC32C, a changed byte in a PAGES or COPY frame must fail the run."""
        return crc and any(changed and t in CHECKED for _, _, t, _, changed in self.done)


def iteration(receiver, seed, i, frames):
    rng = random.Random(f"{seed}-{i}")
    run = RUNS[i % len(RUNS)]
    k = rng.choice((1, 1, 1, 2, 3))
    tamper = Tamper(rng, rng.sample(range(frames[run]), k))
    with tempfile.TemporaryFile(mode="w+") as err:
        end = {"stderr": err, "grace": GRACE}
        source = "completed"
        try:
            spec.migrate(receiver, *run, tamper=tamper, end=end)
        except (spec.Failure, OSError, EOFError, ValueError) as e:
            source = f"{type(e).__name__}: {e}"[:160]
        err.seek(0)
        stderr = err.read()
    what = f"iteration {i} ({run[0]} channel(s), {'CRC32C' if run[2] else 'no checksum'}), " \
           f"changes {[(n, op, hex(t)) for n, op, t, _, _ in tamper.done]}"
    problems = []
    if end.get("exit") is None:
        problems.append(f"the receiver did not exit within {GRACE} s of the source closing")
    elif end["exit"] not in (0, 1):
        problems.append(f"the receiver exited with status {end['exit']}")
    if "panicked" in stderr:
        problems.append("the receiver panicked: " + stderr.strip().splitlines()[-1][:300])
    status = None
    lines = (end.get("stdout") or "").strip().splitlines()
    if end.get("exit") is not None:
        try:
            status = json.loads(lines[-1]).get("status")
        except (IndexError, ValueError, AttributeError):
            problems.append(f"the receiver's last line is not JSON: {lines[-1:]!r}")
        if status not in ("completed", "failed"):
            problems.append(f"the receiver's status is {status!r}")
    if status == "completed" and tamper.crc_must_fail(run[2]):
        problems.append("the receiver completed although a PAGES or COPY frame was changed "
                        "under CRC32C")
    return what, status, source, problems


def main():
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print(__doc__)
        return 2

    def opt(name, default, conv=int):
        return conv(args[args.index(name) + 1]) if name in args else default

    receiver = [args[0], "--max-memory", str(64 << 20)]
    transport = opt("--transport", None, str)
    if transport is not None:
        receiver += ["--transport", transport]
    seed = opt("--seed", random.randrange(1 << 32))
    iterations, seconds = opt("--iterations", 150), opt("--seconds", 240.0, float)
    only = opt("--iteration", None)
    spec.ACK_TIMEOUT = 3
    print(f"seed {seed}" + (f", transport {transport}" if transport else ""))
    # The honest runs first: they must complete, and give how many frames each sends.
    frames = {}
    for run in RUNS:
        count = Tamper(random.Random(0), [])
        spec.migrate(receiver, *run, tamper=count)
        frames[run] = count.n
    print(f"honest runs completed; frames after READY per run: {list(frames.values())}")
    started, failed, done = time.time(), 0, 0
    statuses = {}
    for i in ([only] if only is not None else range(iterations)):
        if time.time() - started > seconds:
            break
        what, status, source, problems = iteration(receiver, seed, i, frames)
        done += 1
        statuses[status] = statuses.get(status, 0) + 1
        if problems:
            failed += 1
            print(f"FAILED  {what}: {'; '.join(problems)} (the source saw: {source})")
        elif only is not None:
            print(f"ok      {what}: receiver {status}; the source saw: {source}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rss > MAX_RSS_KIB:
        failed += 1
        print(f"FAILED  a receiver reached {rss >> 10} MiB of memory (limit {MAX_RSS_KIB >> 10})")
    print(f"{done} iterations in {time.time() - started:.0f} s (seed {seed}): receiver "
          f"{statuses}, largest receiver {rss >> 10} MiB; {failed} failed")
    return 1 if failed or not done else 0


if __name__ == "__main__":
    sys.exit(main())
