#!/usr/bin/env python3
"""Checks a LUKS2 image that a guest test wrote, with tools that share no code with crypt-vfio.

    outside_check.py IMG PASSPHRASE-FILE TREE WORKDIR [DIR-IN-FS:DIR-ON-HOST ...]

The volume key comes from `cryptsetup luksDump --dump-volume-key`, the data segment's offset,
cipher and sector size from `--dump-json-metadata`; tools/dmcrypt_ref.py (OpenSSL) decrypts the
data segment; `e2fsck -fn` must find the filesystem clean; `debugfs -R rdump` copies each
directory or file out (default: /t1 compared with TREE) and every file must match byte for
byte.
Exits non-zero, saying what differs, otherwise.
"""

import filecmp
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def compare(want, got):
    """Every file under `want` is under `got` with the same bytes, and nothing else is."""
    problems = []
    for base, dirs, files in os.walk(want):
        rel = os.path.relpath(base, want)
        other = os.path.join(got, rel)
        if not os.path.isdir(other):
            problems.append(f"missing directory {rel}")
            continue
        extra = set(os.listdir(other)) - set(dirs) - set(files)
        problems += [f"unexpected {os.path.join(rel, e)}" for e in sorted(extra)]
        for f in files:
            a, b = os.path.join(base, f), os.path.join(other, f)
            if not os.path.isfile(b):
                problems.append(f"missing {os.path.join(rel, f)}")
            elif not filecmp.cmp(a, b, shallow=False):
                problems.append(f"differs: {os.path.join(rel, f)}")
    return problems


def main():
    img, keyfile, tree, work = sys.argv[1:5]
    pairs = sys.argv[5:] or [f"/t1:{tree}"]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    vk = os.path.join(work, "vk.bin")
    run("cryptsetup", "luksDump", "-q", "--dump-volume-key", "--key-file", keyfile,
        "--volume-key-file", vk, img, stdout=subprocess.DEVNULL)
    meta = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", img,
                          capture_output=True).stdout)
    seg = meta["segments"]["0"]
    plain = os.path.join(work, "plain.raw")
    run(sys.executable, os.path.join(HERE, "..", "dmcrypt_ref.py"), "decrypt",
        "--cipher", seg["encryption"], "--key-file", vk, "--sector-size", str(seg["sector_size"]),
        "--offset", seg["offset"], img, plain)
    os.unlink(vk)
    fsck = subprocess.run(["e2fsck", "-fn", plain], capture_output=True, text=True)
    if fsck.returncode != 0:
        print(fsck.stdout + fsck.stderr)
        sys.exit(f"{img}: e2fsck -fn on the independently decrypted image exit status {fsck.returncode}")
    failed = False
    for pair in pairs:
        inside, want = pair.split(":", 1)
        out = os.path.join(work, "rdump" + inside.replace("/", "_"))
        os.makedirs(out)
        run("debugfs", "-R", f"rdump {inside} {out}", plain,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = os.path.join(out, os.path.basename(inside))
        if os.path.isfile(want):
            same = os.path.isfile(got) and filecmp.cmp(want, got, shallow=False)
            problems = [] if same else [f"{inside} is missing or differs"]
        elif os.path.isdir(got):
            problems = compare(want, got)
        else:
            problems = [f"{inside} is not in the filesystem"]
        for p in problems[:10]:
            print(f"{img}: {inside}: {p}")
        failed |= bool(problems)
        if not problems:
            n = sum(len(f) for _, _, f in os.walk(want)) if os.path.isdir(want) else 1
            print(f"{img}: {inside}: {n} file(s) read back outside the guest, byte for byte")
    shutil.rmtree(work)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
