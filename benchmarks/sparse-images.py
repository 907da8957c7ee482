#!/usr/bin/env python3
"""Writes two sparse 2 GiB guest images of distinct random pages (BENCHMARKS.md, "Huge pages
where frames are dense"): /tmp/sparse-worst.img, one page written per 2 MiB block, and
/tmp/sparse-runs.img, a quarter of the pages written in runs of 1-256 pages at random places.
Run them with pagewire-stress run --workload fill-from:IMAGE (benchmarks/resident-one.sh)."""
import os
import random

PAGE = 4096
PAGES = 2048 * 256
random.seed(7)
with open("/tmp/sparse-worst.img", "wb") as f:
    f.truncate(PAGES * PAGE)
    for block in range(PAGES // 512):
        f.seek(block * 512 * PAGE)
        f.write(os.urandom(PAGE))
with open("/tmp/sparse-runs.img", "wb") as f:
    f.truncate(PAGES * PAGE)
    written = 0
    while written < PAGES // 4:
        n = random.randint(1, 256)
        start = random.randrange(0, PAGES - n)
        f.seek(start * PAGE)
        f.write(os.urandom(PAGE * n))
        written += n
