#!/usr/bin/env python3
"""An independent dm-crypt sector cipher, to check crypt-vfio's output against.

Written from the dm-crypt documentation with Python's `cryptography` package (OpenSSL), sharing
no code with crypt-vfio. It encrypts or decrypts the data area of a file the way the kernel's
dm-crypt target does for `aes-{xts,cbc,ctr}-{plain,plain64,plain64be,essiv:sha256}`.

    dmcrypt_ref.py decrypt|encrypt --cipher aes-xts-plain64 --key-file vk.bin \
        [--sector-size 512] [--offset BYTES] [--iv-offset SECTORS] [--iv-large-sectors] \
        [--size BYTES] IN OUT

IN is read from --offset for --size bytes (default: to the end); OUT gets the result alone.
"""

import argparse
import hashlib
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def iv_for(ivmode, sector, key):
    if ivmode == "plain":
        return (sector & 0xFFFFFFFF).to_bytes(4, "little") + bytes(12)
    if ivmode == "plain64":
        return (sector & (2**64 - 1)).to_bytes(8, "little") + bytes(8)
    if ivmode == "plain64be":
        return bytes(8) + (sector & (2**64 - 1)).to_bytes(8, "big")
    if ivmode == "essiv:sha256":
        salt = hashlib.sha256(key).digest()
        enc = Cipher(algorithms.AES(salt), modes.ECB()).encryptor()
        return enc.update((sector & (2**64 - 1)).to_bytes(8, "little") + bytes(8)) + enc.finalize()
    raise SystemExit(f"unsupported IV mode {ivmode}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["encrypt", "decrypt"])
    p.add_argument("--cipher", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("--sector-size", type=int, default=512)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--iv-offset", type=int, default=0)
    p.add_argument("--iv-large-sectors", action="store_true")
    p.add_argument("--size", type=int)
    p.add_argument("input")
    p.add_argument("output")
    a = p.parse_args()

    name, chain, ivmode = a.cipher.split("-", 2)
    if name != "aes":
        raise SystemExit(f"unsupported cipher {name}")
    key = open(a.key_file, "rb").read()
    with open(a.input, "rb") as f:
        f.seek(a.offset)
        data = f.read(a.size) if a.size is not None else f.read()
    ss = a.sector_size
    if len(data) % ss:
        raise SystemExit(f"{len(data)} bytes is not a whole number of {ss}-byte sectors")
    shift = (ss // 512).bit_length() - 1
    out = bytearray()
    for i in range(len(data) // ss):
        s512 = (i << shift) + a.iv_offset
        sector = s512 >> shift if a.iv_large_sectors else s512
        iv = iv_for(ivmode, sector, key)
        if chain == "xts":
            mode = modes.XTS(iv)
        elif chain == "cbc":
            mode = modes.CBC(iv)
        elif chain == "ctr":
            mode = modes.CTR(iv)
        else:
            raise SystemExit(f"unsupported chaining mode {chain}")
        c = Cipher(algorithms.AES(key), mode)
        op = c.encryptor() if a.op == "encrypt" else c.decryptor()
        out += op.update(data[i * ss:(i + 1) * ss]) + op.finalize()
    with open(a.output, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    sys.exit(main())
