#!/usr/bin/env python3
"""Writes a deterministic tree of files for the guest tests to copy onto a filesystem.

    tree.py DIR SEED COUNT

COUNT files of 1 byte to 256 KiB (most of them small, as on a real filesystem) in nested
directories, their bytes drawn from SEED: the same arguments give the same tree, byte for byte.
"""

import os
import random
import sys


def main():
    root, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    for i in range(count):
        depth = rng.randrange(0, 4)
        d = os.path.join(root, *[f"d{rng.randrange(0, 5)}" for _ in range(depth)])
        os.makedirs(d, exist_ok=True)
        # Sizes spread over 1 B .. 256 KiB on a log scale.
        size = int(2 ** rng.uniform(0, 18))
        with open(os.path.join(d, f"f{i:04d}.bin"), "wb") as f:
            f.write(rng.randbytes(size))


if __name__ == "__main__":
    main()
