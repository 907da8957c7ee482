#!/usr/bin/python3
"""pagewire's real source (the `send` example) migrates into a destination written from
PROTOCOL.md alone (`receive_from_spec.py`), under the choices PROTOCOL.md leaves to a
destination, and the destination's memory must equal what the source holds at the end.

    python3 protocol/conformance/send_into_spec.py target/release/examples/send

Each case runs 3 rounds (round 0 every page, then every 7th page changed; the `send`
example's `--out` is the memory the destination must hold) of a 2 MiB guest of zero
pages, pages of one repeated byte, random pages and repeated text pages (so COPY frames
travel). A last case gives the destination no zstd against a source told to send zstd
only: the source must refuse the WELCOME with REJECT NO_COMMON_CODEC (reason 3).
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SESSION = "pagewire-spec-02"

CASES = [
    # (name, destination options, source options)
    ("none, 1 channel", [], ["--codec", "none", "--channels", "1"]),
    ("lz4, 2 channels", [], ["--codec", "lz4", "--channels", "2"]),
    ("zstd, 4 channels", [], ["--codec", "zstd", "--channels", "4"]),
    ("deflate, 2 channels", [], ["--codec", "deflate", "--channels", "2"]),
    ("delta, 2 channels", [], ["--codec", "delta", "--channels", "2"]),
    ("auto, 2 channels", [], ["--codec", "auto", "--channels", "2"]),
    ("zstd, the smallest frame limit and 1 page a frame",
     ["--max-pages", "1", "--max-frame-bytes", "-1"], ["--codec", "zstd", "--channels", "2"]),
    ("auto, raw and zero only", ["--codecs", "raw,zero"], ["--codec", "auto", "--channels", "2"]),
    ("delta without CRC32C", ["--no-crc"], ["--codec", "delta", "--channels", "2"]),
    ("lz4, extension frames and ACK FRAMES from the destination",
     ["--send-ext", "--ack-frames"], ["--codec", "lz4", "--channels", "2"]),
    # At 4 KiB pages every deflate stream is a deflate-4k one (PROTOCOL.md, Codecs): a
    # source of deflate sends it as deflate-4k to a destination that decodes only that.
    ("deflate, a destination of deflate-4k only",
     ["--codecs", "raw,zero,deflate-4k"], ["--codec", "deflate", "--channels", "2"],
     "PAGES codec=deflate-4k"),
]


def image(path):
    rng = random.Random(7)
    text = b"".join(b"line %d of a file the guest keeps twice\n" % i for i in range(120))[:4096]
    pages = []
    for i in range(512):
        kind = i % 5
        if kind == 0:
            pages.append(bytes(4096))
        elif kind == 1:
            pages.append(bytes([0xCC]) * 4096)
        elif kind == 2:
            pages.append(rng.randbytes(4096))
        else:
            pages.append(text[: 4096 - i % 3] + bytes(i % 3))
    with open(path, "wb") as f:
        f.write(b"".join(pages))


def run_case(send, tmp, name, dest_opts, src_opts, key, img):
    port_file = os.path.join(tmp, "port")
    final = os.path.join(tmp, "final")
    result = os.path.join(tmp, "result.json")
    for f in (port_file, final, result):
        if os.path.exists(f):
            os.remove(f)
    # The destination compares its memory with `final` after COMMIT; the source writes
    # it before COMPLETE.
    dest = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "receive_from_spec.py"), "--port", "0",
         "--port-file", port_file, "--key-file", key, "--image", final, "--json", result,
         "--idle-timeout", "30"] + dest_opts,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file) and time.monotonic() < deadline and dest.poll() is None:
        time.sleep(0.05)
    if not os.path.exists(port_file):
        dest.kill()
        return False, "the destination did not start: " + dest.communicate()[0][-2000:]
    port = open(port_file).read().strip()
    src = subprocess.run(
        [send, "--to", "127.0.0.1:" + port, "--key-file", key, "--session", SESSION,
         "--image", img, "--rounds", "3", "--out", final] + src_opts,
        capture_output=True, text=True, timeout=120)
    try:
        out, _ = dest.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        dest.kill()
        return False, "the destination did not end within 60 s of the source"
    verdict = json.loads(src.stdout.strip().splitlines()[-1]) if src.stdout.strip() else {}
    return (src.returncode, dest.returncode, verdict, out, result)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    send = sys.argv[1]
    tmp = tempfile.mkdtemp(prefix="pagewire-send-spec-")
    key, img = os.path.join(tmp, "key"), os.path.join(tmp, "image")
    with open(key, "wb") as f:
        f.write(b"a key for the spec destination, 41 bytes\n")
    image(img)
    failed = 0
    for name, dest_opts, src_opts, *must in CASES:
        r = run_case(send, tmp, name, dest_opts, src_opts, key, img)
        if r[0] is False:
            print("FAILED ", name + ":", r[1])
            failed += 1
            continue
        src_rc, dest_rc, verdict, out, result = r
        ok = src_rc == 0 and dest_rc == 0 and verdict.get("status") == "committed" \
            and "OK: memory equals image" in out
        stats = json.load(open(result)).get("stats", {}) if ok else {}
        missing = [m for m in must if not any(k.startswith(m) for k in stats)]
        if ok and missing:
            failed += 1
            print("FAILED ", name + ": no", missing, "in", json.dumps(stats, sort_keys=True)[:600])
        elif ok:
            print("ok     ", name + ":", json.dumps(stats, sort_keys=True)[:300])
        else:
            failed += 1
            print("FAILED ", name + ": source", src_rc, verdict, "| destination", dest_rc,
                  out[-3000:])
    # A source of zstd only, a destination without zstd: REJECT NO_COMMON_CODEC.
    r = run_case(send, tmp, "refusal", ["--codecs", "raw,zero,lz4"], ["--codec", "zstd"], key, img)
    if r[0] is False:
        print("FAILED  refusal:", r[1])
        failed += 1
    else:
        src_rc, dest_rc, verdict, out, result = r
        told = json.load(open(result)).get("failed") or "" if os.path.exists(result) else ""
        if src_rc == 1 and "zstd" in verdict.get("error", "") and "reason 3" in told:
            print("ok      a source of zstd only refuses a WELCOME without zstd:", told[:120])
        else:
            failed += 1
            print("FAILED  refusal: source", src_rc, verdict, "| destination", dest_rc, told,
                  out[-2000:])
    print("%d of %d cases failed" % (failed, len(CASES) + 1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
