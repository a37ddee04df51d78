#!/usr/bin/env bash
# Decrypt throughput of a 512 MiB LUKS1 aes-xts-plain64 image: `crypt-vfio decrypt` and
# `qemu-img convert` side by side in one run, three times each, medians printed.
#
#   cargo build --release && tools/bench-luks-decrypt.sh [WORKDIR] [-- extra crypt-vfio decrypt flags]
#
# The image is made once by qemu-img from random data (kept in WORKDIR between runs); both
# outputs are compared with the plaintext at the end. Page-cache writeback is flushed before
# every timed command so that one run's writes are not billed to the next.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${CRYPT_VFIO:-$here/target/release/crypt-vfio}"
work="${1:-/tmp/crypt-vfio-bench}"
shift || true
[ "${1:-}" = "--" ] && shift
mkdir -p "$work"
cd "$work"
printf 'bench passphrase' > pass.txt
if [ ! -f img.luks ]; then
    head -c $((512 << 20)) /dev/urandom > plain.raw
    # qemu-img's PBKDF2 benchmark fails now and then ("Unable to get accurate CPU usage").
    for _ in 1 2 3 4 5; do
        rm -f img.luks
        qemu-img convert -f raw -O luks --object secret,id=s0,file=pass.txt \
            -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10 \
            plain.raw img.luks && break
    done
fi
now() { date +%s.%N; }
median() { sort -n | sed -n 2p; }
: > cv.times
: > q.times
for _ in 1 2 3; do
    rm -f out-cv.raw out-q.raw
    sync
    s=$(now); "$bin" decrypt "$@" --key-file pass.txt img.luks out-cv.raw; e=$(now)
    echo "$e - $s" | bc >> cv.times
    sync
    s=$(now)
    qemu-img convert --object secret,id=s0,file=pass.txt \
        --image-opts driver=luks,key-secret=s0,file.filename=img.luks -O raw out-q.raw
    e=$(now)
    echo "$e - $s" | bc >> q.times
done
cmp out-cv.raw plain.raw
cmp out-q.raw plain.raw
cv=$(median < cv.times)
q=$(median < q.times)
echo "crypt-vfio decrypt: $(paste -sd' ' cv.times) s -> median $cv s, $(echo "512 / $cv" | bc) MiB/s"
echo "qemu-img convert:   $(paste -sd' ' q.times) s -> median $q s, $(echo "512 / $q" | bc) MiB/s"
echo "both outputs equal the plaintext"
