#!/usr/bin/env bash
# NBD read throughput of one LUKS1 aes-xts-plain64 image: `nbdcopy URI null:` through nbdkit's
# file plugin (the plaintext, no crypto: the NBD ceiling), `crypt-vfio serve --raw` of the
# plaintext (our NBD server alone), nbdkit's luks filter (the peer), and `crypt-vfio serve` with
# its default engine and with the emulated device, for 256-bit and 512-bit XTS keys. The
# server's CPU time (user + system, from /proc) per GB is printed beside each rate: it varies
# less than the rate on a shared machine. Every round runs every server once, in turn, so the ratios
# come from one run; three rounds, medians printed.
#
#   cargo build --release && tools/bench-serve.sh [--competitor N] [--json] [--size MIB] [WORKDIR]
#
# --competitor N runs N CPU-bound processes (`sh -c 'while :; do :; done'`) beside every timed
# copy. WORKDIR (default /dev/shm/crypt-vfio-bench, tmpfs) keeps the images between runs.
# CRYPT_VFIO=path picks the binary; CRYPT_VFIO_BASELINE=path adds a column for a second binary
# (an older build, for before/after numbers from one run). Output: a table, or with --json one
# JSON object (GB/s medians and the runs).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=tools/bench-common.sh
. "$here/tools/bench-common.sh"
bin="${CRYPT_VFIO:-$here/target/release/crypt-vfio}"
baseline="${CRYPT_VFIO_BASELINE:-}"
competitors=0
json=0
mib=512
work=/dev/shm/crypt-vfio-bench
while [ $# -gt 0 ]; do
    case "$1" in
        --competitor) competitors=$2; shift 2 ;;
        --json) json=1; shift ;;
        --size) mib=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) work=$1; shift ;;
    esac
done
for tool in nbdkit nbdcopy qemu-img awk; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
[ -x "$bin" ] || { echo "$bin not found: cargo build --release first" >&2; exit 1; }
mkdir -p "$work"
cd "$work"
make_images "$mib" 256 512
bytes=$((mib << 20))
sock="$work/nbd.sock"
server_pid=

stop_server() {
    if [ -n "$server_pid" ]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
    rm -f "$sock"
}
trap 'stop_server; stop_competitors' EXIT

# start_server CONFIG BITS: one server on $sock, ready when the socket appears.
start_server() {
    local img="img-$2.luks"
    rm -f "$sock"
    case "$1" in
        file) nbdkit -f -U "$sock" file plain.raw & ;;
        serve-raw) "$bin" serve --socket "$sock" --read-only --raw plain.raw >/dev/null 2>serve.log & ;;
        nbdkit-luks) nbdkit -f -U "$sock" --filter=luks file "$img" passphrase=+pass.txt & ;;
        serve) "$bin" serve --socket "$sock" --read-only --key-file pass.txt "$img" >/dev/null 2>serve.log & ;;
        serve-emulated)
            "$bin" serve --socket "$sock" --read-only --device emulated --key-file pass.txt "$img" \
                >/dev/null 2>serve.log & ;;
        serve-baseline) "$baseline" serve --socket "$sock" --read-only --key-file pass.txt "$img" >/dev/null 2>serve.log & ;;
    esac
    server_pid=$!
    for _ in $(seq 300); do
        [ -S "$sock" ] && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "server $1 ($2-bit) did not start; serve.log:" >&2
    cat serve.log >&2 2>/dev/null || true
    exit 1
}

configs=("file:0" "serve-raw:0")
for bits in 256 512; do
    configs+=("nbdkit-luks:$bits" "serve:$bits" "serve-emulated:$bits")
    [ -n "$baseline" ] && configs+=("serve-baseline:$bits")
done
declare -A runs cpu
# Clock ticks (user + system) a process has used.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
for _round in 1 2 3; do
    for c in "${configs[@]}"; do
        name=${c%%:*}
        bits=${c##*:}
        start_server "$name" "$bits"
        start_competitors "$competitors"
        t0=$(ticks "$server_pid")
        s=$(now)
        nbdcopy "nbd+unix:///?socket=$sock" null:
        e=$(now)
        t1=$(ticks "$server_pid")
        stop_competitors
        cpu[$c]="${cpu[$c]:-} $(awk -v t=$((t1 - t0)) -v hz="$hz" -v b="$bytes" 'BEGIN { printf "%.3f", t / hz / (b / 1e9) }')"
        stop_server
        runs[$c]="${runs[$c]:-} $(gbps "$bytes" "$(awk -v s="$s" -v e="$e" 'BEGIN { print e - s }')")"
    done
done
# The data each server sent is checked once, outside the timing.
for bits in 256 512; do
    start_server serve "$bits"
    nbdcopy "nbd+unix:///?socket=$sock" check.raw
    stop_server
    cmp check.raw plain.raw || { echo "serve ($bits-bit) sent other data than the plaintext" >&2; exit 1; }
    rm -f check.raw
done
engine_line=$(grep -m1 'engine' serve.log 2>/dev/null || echo "")

med() { tr ' ' '\n' <<<"${runs[$1]}" | grep . | median; }
cpu_med() { tr ' ' '\n' <<<"${cpu[$1]}" | grep . | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
file=$(med file:0)
if [ "$json" = 1 ]; then
    printf '{"size_mib": %d, "competitors": %d, "file_gbps": %s, "file_runs": [%s], "file_cpu_s_per_gb": %s' \
        "$mib" "$competitors" "$file" "$(echo "${runs[file:0]}" | xargs | tr ' ' ',')" "$(cpu_med file:0)"
    printf ', "serve_raw_gbps": %s, "serve_raw_runs": [%s], "serve_raw_cpu_s_per_gb": %s' "$(med serve-raw:0)" \
        "$(echo "${runs[serve-raw:0]}" | xargs | tr ' ' ',')" "$(cpu_med serve-raw:0)"
    for bits in 256 512; do
        printf ', "%s": {' "$bits"
        sep=
        for name in nbdkit-luks serve serve-emulated serve-baseline; do
            [ -n "${runs[$name:$bits]:-}" ] || continue
            printf '%s"%s_gbps": %s, "%s_runs": [%s], "%s_cpu_s_per_gb": %s' "$sep" "${name//-/_}" \
                "$(med "$name:$bits")" "${name//-/_}" "$(echo "${runs[$name:$bits]}" | xargs | tr ' ' ',')" \
                "${name//-/_}" "$(cpu_med "$name:$bits")"
            sep=', '
        done
        printf '}'
    done
    printf '}\n'
    exit 0
fi
echo "nbdcopy of a ${mib} MiB LUKS1 aes-xts-plain64 image over a Unix socket, GB/s, median of 3" \
    "(runs in brackets), $competitors CPU-bound competitor(s); $(nproc) CPUs"
[ -n "$engine_line" ] && echo "serve's default engine: ${engine_line#crypt-vfio: }"
printf '%-24s %-6s %-20s %-9s %s\n' "server" "GB/s" "runs" "CPU s/GB" "ratios"
printf '%-24s %-6s %-20s %-9s\n' "nbdkit file (no crypto)" "$file" "[$(echo "${runs[file:0]}" | xargs)]" "$(cpu_med file:0)"
raw=$(med serve-raw:0)
printf '%-24s %-6s %-20s %-9s / file %s\n' "serve --raw (no crypto)" "$raw" "[$(echo "${runs[serve-raw:0]}" | xargs)]" \
    "$(cpu_med serve-raw:0)" "$(ratio "$raw" "$file")"
for bits in 256 512; do
    luks=$(med "nbdkit-luks:$bits")
    for name in nbdkit-luks serve serve-emulated serve-baseline; do
        [ -n "${runs[$name:$bits]:-}" ] || continue
        m=$(med "$name:$bits")
        extra=
        [ "$name" != nbdkit-luks ] && extra="/ luks $(ratio "$m" "$luks"), / file $(ratio "$m" "$file")"
        printf '%-24s %-6s %-20s %-9s %s\n' "$name $bits-bit" "$m" "[$(echo "${runs[$name:$bits]}" | xargs)]" \
            "$(cpu_med "$name:$bits")" "$extra"
    done
done
