#!/usr/bin/env python3
"""Writes seeds built from the NBD protocol description, for what the captured sessions do not
cover (refused options, old-style EXPORT_NAME, every command and the refusals).

Usage: protocol_seeds.py OUT_DIR
"""
import os, struct, sys

IHAVEOPT = b"IHAVEOPT"
FIXED, NO_ZEROES = 1, 2


def option(kind, data=b""):
    return IHAVEOPT + struct.pack(">II", kind, len(data)) + data


def go(name=b"", infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def request(kind, handle, offset, length, flags=0, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, handle, offset, length) + payload


def main():
    out = sys.argv[1]
    hs = {
        "list-info-go": struct.pack(">I", FIXED | NO_ZEROES) + option(3) + option(6, go(b"disk", (0, 1, 2, 3)))
        + option(7, go(b"disk", (3,))) + request(0, 1, 0, 512) + request(2, 2, 0, 0),
        "refused-options": struct.pack(">I", FIXED) + option(8) + option(5) + option(9, b"\0" * 8) + option(99, b"x")
        + option(7, go(b"nope")) + option(1, b"disk"),
        "old-export-name": struct.pack(">I", 0) + option(1, b"") + request(0, 1, 4096, 4096),
        "abort": struct.pack(">I", FIXED) + option(2),
        "bad-go-lengths": struct.pack(">I", FIXED) + option(7, b"\0\0\0\x09ab") + option(7, b"\xff\xff\xff\xff"),
    }
    rq = {
        "every-command": request(1, 1, 0, 4096, 1, b"\x5a" * 4096) + request(0, 2, 0, 4096) + request(3, 3, 0, 0)
        + request(4, 4, 8192, 4096) + request(6, 5, 0, 8192, 2) + request(5, 6, 0, 512) + request(7, 7, 0, 512)
        + request(2, 8, 0, 0),
        "refusals": request(0, 1, (1 << 20) - 100, 4096) + request(0, 2, 0, 1 << 24) + request(1, 3, 1 << 40, 16, 0, b"y" * 16)
        + request(1, 4, 0, (64 << 10) + 1, 0, b"z" * ((64 << 10) + 1)) + request(3, 5, 1, 1) + request(0, 6, 0, 8, 0xff)
        + request(6, 7, 0xffffffffffffffff, 1) + request(4, 8, 0, 0xffffffff),
        "bad-magic": request(0, 1, 0, 512)[:-1] + b"\x13\x95\x60\x25" + b"\0" * 24,
    }
    for sub, seeds in (("nbd_handshake", hs), ("nbd_requests", rq)):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(out, sub, "proto-" + name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
