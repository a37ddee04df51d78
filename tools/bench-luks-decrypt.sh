#!/usr/bin/env bash
# Decrypt throughput of a LUKS1 aes-xts-plain64 image made by qemu-img: `crypt-vfio decrypt`
# (default engine), `qemu-img convert`, and `cp` of the same amount of plaintext (the copy
# ceiling: one read and one write of every byte), side by side in each of three rounds, medians
# printed; the ratios come from one run.
#
#   cargo build --release && tools/bench-luks-decrypt.sh [--competitor N] [--key-bits 256|512]
#       [--size MIB] [--json] [WORKDIR] [-- extra crypt-vfio decrypt flags]
#
# WORKDIR (default /dev/shm/crypt-vfio-bench, tmpfs) keeps the images between runs. Every output
# is compared with the plaintext at the end. Writeback is flushed before every timed command so
# that one run's writes are not billed to the next. --competitor N runs N CPU-bound processes
# beside every timed command. CRYPT_VFIO=path picks the binary.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=tools/bench-common.sh
. "$here/tools/bench-common.sh"
bin="${CRYPT_VFIO:-$here/target/release/crypt-vfio}"
competitors=0
bits=512
mib=512
json=0
work=/dev/shm/crypt-vfio-bench
while [ $# -gt 0 ]; do
    case "$1" in
        --competitor) competitors=$2; shift 2 ;;
        --key-bits) bits=$2; shift 2 ;;
        --size) mib=$2; shift 2 ;;
        --json) json=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) work=$1; shift ;;
    esac
done
case "$bits" in 256|512) ;; *) echo "--key-bits is 256 or 512" >&2; exit 2 ;; esac
[ -x "$bin" ] || { echo "$bin not found: cargo build --release first" >&2; exit 1; }
mkdir -p "$work"
cd "$work"
make_images "$mib" "$bits"
img="img-$bits.luks"
bytes=$((mib << 20))
trap 'stop_competitors' EXIT

# timed FILE CMD...: appends the seconds CMD took to FILE.
timed() {
    local out=$1
    shift
    sync
    start_competitors "$competitors"
    local s e
    s=$(now)
    "$@"
    e=$(now)
    stop_competitors
    awk -v s="$s" -v e="$e" 'BEGIN { print e - s }' >> "$out"
}

: > cv.times
: > q.times
: > cp.times
for _ in 1 2 3; do
    rm -f out-cv.raw out-q.raw out-cp.raw
    timed cv.times "$bin" decrypt "$@" --key-file pass.txt "$img" out-cv.raw 2>cv.log
    timed q.times qemu-img convert --object secret,id=s0,file=pass.txt \
        --image-opts "driver=luks,key-secret=s0,file.filename=$img" -O raw out-q.raw
    timed cp.times cp plain.raw out-cp.raw
done
cmp out-cv.raw plain.raw
cmp out-q.raw plain.raw
cmp out-cp.raw plain.raw
rm -f out-cv.raw out-q.raw out-cp.raw
rate() { gbps "$bytes" "$(median < "$1")"; }
runs() { while read -r t; do gbps "$bytes" "$t"; printf ' '; done < "$1" | xargs; }
cv=$(rate cv.times)
q=$(rate q.times)
cp=$(rate cp.times)
if [ "$json" = 1 ]; then
    printf '{"size_mib": %d, "key_bits": %d, "competitors": %d, "decrypt_gbps": %s, "qemu_img_gbps": %s, "cp_gbps": %s, "decrypt_runs": [%s], "qemu_img_runs": [%s], "cp_runs": [%s]}\n' \
        "$mib" "$bits" "$competitors" "$cv" "$q" "$cp" "$(runs cv.times | tr ' ' ',')" \
        "$(runs q.times | tr ' ' ',')" "$(runs cp.times | tr ' ' ',')"
    exit 0
fi
echo "${mib} MiB LUKS1 aes-xts-plain64, $bits-bit key, tmpfs to tmpfs, GB/s, median of 3 (runs in brackets)," \
    "$competitors CPU-bound competitor(s); $(nproc) CPUs"
engine=$(grep -m1 'engine:' cv.log || true)
[ -n "$engine" ] && echo "decrypt's ${engine#crypt-vfio: }"
printf '%-22s %-7s [%s]  / cp %s\n' "crypt-vfio decrypt" "$cv" "$(runs cv.times)" \
    "$(awk -v a="$cv" -v b="$cp" 'BEGIN { printf "%.2f", a / b }')"
printf '%-22s %-7s [%s]  / cp %s\n' "qemu-img convert" "$q" "$(runs q.times)" \
    "$(awk -v a="$q" -v b="$cp" 'BEGIN { printf "%.2f", a / b }')"
printf '%-22s %-7s [%s]\n' "cp (plaintext)" "$cp" "$(runs cp.times)"
echo "all outputs equal the plaintext"
