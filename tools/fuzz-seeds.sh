#!/usr/bin/env bash
# Makes the seed corpora of the fuzz targets (fuzz/seeds/TARGET/) from real images: written by
# crypt-vfio's own format, by cryptsetup (LUKS1, LUKS2, unbound key slot, reencryption in
# progress, damaged primary) and by qemu-img (LUKS1, AES-192-XTS). Seeds are headers only:
# a few KiB each (LUKS2: both header copies, 32 KiB). The hand-written seeds (luks1_unlock's
# unchanged template, luks2_json's merge patches) are kept in the repository as they are.
# Usage: tools/fuzz-seeds.sh [PATH-TO-crypt-vfio]   (default: target/debug/crypt-vfio)
set -euo pipefail
cd "$(dirname "$0")/.."
CV=${1:-${CARGO_TARGET_DIR:-target}/debug/crypt-vfio}
[ -x "$CV" ] || { echo "build crypt-vfio first (cargo build), or pass its path" >&2; exit 1; }
S=fuzz/seeds
mkdir -p $S/luks_image $S/luks1_unlock $S/luks2_json $S/auth_superblock
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
printf fuzz > "$T/pass"
printf other > "$T/other"
CS=$(command -v cryptsetup || echo /usr/sbin/cryptsetup)

head_of() { head -c "$2" "$1"; }
json_of() { dd if="$1" bs=4096 skip=1 count=3 status=none | tr -d '\000'; }
luks2_seed() { # image name
    head_of "$1" 32768 > "$S/luks_image/$2"
    json_of "$1" > "$S/luks2_json/$2.json"
}

# crypt-vfio's own.
"$CV" format --type luks1 --pbkdf-force-iterations 1000 --size 1048576 --key-file "$T/pass" "$T/cv1.img"
head_of "$T/cv1.img" 4096 > $S/luks_image/luks1-crypt-vfio-xts
"$CV" format --type luks1 -c aes-cbc-essiv:sha256 --hash sha1 --pbkdf-force-iterations 1000 --size 1048576 --key-file "$T/pass" "$T/cv1c.img"
head_of "$T/cv1c.img" 4096 > $S/luks_image/luks1-crypt-vfio-cbc-essiv-sha1
"$CV" format --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --size 1048576 --key-file "$T/pass" "$T/cv2.img"
luks2_seed "$T/cv2.img" crypt-vfio-pbkdf2
"$CV" format --type luks2 --pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 64 --pbkdf-parallel 1 --size 1048576 --key-file "$T/pass" "$T/cv2a.img"
luks2_seed "$T/cv2a.img" crypt-vfio-argon2id
# The geometry and key of the auth_superblock target's own volume: 16 KiB, 512-byte sectors,
# the key 0x42 x 32.
python3 -c 'import sys; sys.stdout.buffer.write(b"\x42" * 32)' > "$T/authkey"
head -c 16384 /dev/urandom > "$T/plain"
"$CV" encrypt --type authenticated --sector-size 512 --volume-key-file "$T/authkey" "$T/plain" "$T/auth.img"
head_of "$T/auth.img" 8192 > $S/auth_superblock/crypt-vfio

if [ -x "$CS" ]; then
    for h in sha1 sha256 sha512; do
        truncate -s 4M "$T/cs1-$h.img"
        "$CS" luksFormat -q --type luks1 --hash $h --pbkdf-force-iterations 1000 --key-file "$T/pass" "$T/cs1-$h.img"
        head_of "$T/cs1-$h.img" 4096 > $S/luks_image/luks1-cryptsetup-$h
    done
    truncate -s 20M "$T/cs2.img"
    "$CS" luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --luks2-metadata-size 16k --key-file "$T/pass" "$T/cs2.img"
    luks2_seed "$T/cs2.img" cryptsetup-pbkdf2
    "$CS" luksAddKey -q --unbound --key-size 512 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 "$T/cs2.img" "$T/other"
    luks2_seed "$T/cs2.img" cryptsetup-unbound
    truncate -s 40M "$T/re.img"
    "$CS" luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --luks2-metadata-size 16k --key-file "$T/pass" "$T/re.img"
    "$CS" reencrypt -q --init-only --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$T/pass" "$T/re.img"
    luks2_seed "$T/re.img" cryptsetup-reencrypt
    cp "$S/luks_image/cryptsetup-pbkdf2" "$S/luks_image/cryptsetup-damaged-primary"
    printf 'XXXX' | dd of="$S/luks_image/cryptsetup-damaged-primary" conv=notrunc status=none
else
    echo "cryptsetup not found: its seeds are not made" >&2
fi

if command -v qemu-img > /dev/null; then
    for alg in "aes-256 xts plain64" "aes-128 cbc essiv" "aes-192 xts plain64"; do
        set -- $alg
        extra=""
        [ "$3" = essiv ] && extra=",ivgen-hash-alg=sha256"
        # qemu-img's PBKDF2 benchmark fails now and then: retry.
        for _ in 1 2 3 4 5; do
            qemu-img create -q -f luks --object secret,id=s0,data=fuzz \
                -o key-secret=s0,cipher-alg=$1,cipher-mode=$2,ivgen-alg=$3$extra,iter-time=10 "$T/q.img" 4M && break
        done
        head_of "$T/q.img" 4096 > "$S/luks_image/luks1-qemu-$1-$2-$3"
    done
fi
ls -l $S/*
