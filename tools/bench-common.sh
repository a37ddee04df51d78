# Shared by tools/bench-serve.sh and tools/bench-luks-decrypt.sh (sourced, not run): the test
# image, CPU-bound competitors, timing and medians, so that both scripts measure the same way.

# make_images SIZE_MIB KEY_BITS...: plain.raw (random) and img-BITS.luks (LUKS1
# aes-xts-plain64 made by qemu-img, which is what users have) in the current directory; kept
# between runs. A 256-bit XTS key is AES-128-XTS (cryptsetup's default), 512-bit AES-256-XTS.
make_images() {
    local mib=$1
    shift
    printf 'bench passphrase' > pass.txt
    if [ ! -f plain.raw ] || [ "$(stat -c %s plain.raw)" -ne $((mib << 20)) ]; then
        rm -f plain.raw img-*.luks
        head -c $((mib << 20)) /dev/urandom > plain.raw
    fi
    local bits
    for bits in "$@"; do
        [ -f "img-$bits.luks" ] && continue
        # qemu-img's PBKDF2 benchmark fails now and then ("Unable to get accurate CPU usage").
        for _ in 1 2 3 4 5; do
            rm -f "img-$bits.luks"
            qemu-img convert -f raw -O luks --object secret,id=s0,file=pass.txt \
                -o "key-secret=s0,cipher-alg=aes-$((bits / 2)),cipher-mode=xts,ivgen-alg=plain64,iter-time=10" \
                plain.raw "img-$bits.luks" && break
        done
        [ -f "img-$bits.luks" ] || { echo "qemu-img could not make img-$bits.luks" >&2; exit 1; }
    done
}

competitor_pids=()

# start_competitors N: N CPU-bound processes beside the measured job (a busy machine).
start_competitors() {
    local i
    for ((i = 0; i < $1; i++)); do
        sh -c 'while :; do :; done' &
        competitor_pids+=($!)
    done
}

stop_competitors() {
    local p
    for p in "${competitor_pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    competitor_pids=()
}

now() { date +%s.%N; }

# median: the middle of the numbers on standard input (the lower middle for an even count).
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# gbps BYTES SECONDS
gbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.3f", b / s / 1e9 }'; }
