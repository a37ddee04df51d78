#!/bin/busybox sh
# The guest's /init for tools/block-guest-test.sh: crypt-vfio's decrypted volumes as kernel block
# devices, with a filesystem on them, in Debian 13's kernel.
#
# The initramfs holds busybox, crypt-vfio, the kernel's modules (/lib/modules, load order in
# /lib/modules/order), mke2fs and e2fsck with their libraries (/tools), the reference tree
# (/tree) and the passphrase (/key). The LUKS2 images are virtio disks found by serial.
# Every step is logged as `=== name: ok|FAILED`; the last line is the verdict.
/bin/busybox --install -s /bin
# mke2fs and e2fsck are called by their full paths: busybox sh runs its own applets first.
export PATH=/bin LD_LIBRARY_PATH=/tools/lib
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
. /steps.sh
# Huge pages make each DMA region physically contiguous (QEMU's virtio behind its IOMMU misreads
# a descriptor table spanning non-contiguous pages).
echo 128 >/proc/sys/vm/nr_hugepages

for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || failed insmod "insmod $m failed"
done
echo "=== modules: $(cat /lib/modules/order | tr '\n' ' ')[$(uptime_s) s]"
[ -c /dev/ublk-control ] || failed ublk "no /dev/ublk-control after insmod ublk_drv"
[ -b /dev/nbd0 ] || failed nbd "no /dev/nbd0 after insmod nbd"

# disk SERIAL: the virtio disk QEMU gave that serial.
disk() {
    for d in /sys/block/vd*; do
        [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && echo /dev/${d##*/} && return
    done
}
BDF=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1054 ]; then BDF=${d##*/}; fi
done
[ -n "$BDF" ] || failed find-device "no virtio-crypto function (1af4:1054)"
step bind crypt-vfio bind $BDF
step selftest crypt-vfio selftest --device $BDF

# gone PID: the process has exited (an orphaned daemon stays a zombie until init reaps it).
gone() { [ ! -e /proc/$1 ] || grep -q ') Z' /proc/$1/stat; }

# Nothing in the kernel log may say a block device or filesystem saw an error.
kernel_errors() {
    dmesg | grep -E "I/O error|EXT4-fs error|Buffer I/O|blk_update_request|critical medium" | head -5
}

# fs_round NAME DEV TREE-DIR: a filesystem on DEV, a tree written and read back, fsck clean.
fs_round() {
    fs=$1
    dev=$2
    step $fs-bs sh -c "test \$(cat /sys/block/${dev##*/}/queue/logical_block_size) = 4096"
    step $fs-mkfs /tools/bin/mke2fs -q -F -t ext4 -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 $dev
    mkdir -p /mnt/$fs
    step $fs-mount mount -t ext4 $dev /mnt/$fs
    step $fs-write cp -a /tree /mnt/$fs/t1
    step $fs-sync sync
    step $fs-diff diff -r /tree /mnt/$fs/t1
    step $fs-umount umount /mnt/$fs
    step $fs-fsck /tools/bin/e2fsck -fn $dev
}

# inflight DEV: requests the block layer has on DEV (reads + writes).
inflight() {
    read r w </sys/block/$1/inflight
    echo $((r + w))
}
# all_files: the tree's files in one stream, in a fixed order (what the big writer writes).
all_files() { find /tree -type f | sort | xargs cat; }

# ublk_round NAME IMG ENGINE...: /dev/ublkbN on IMG with a filesystem; while writers run, the
# server is killed with SIGKILL and a new one takes over with --recover; the writers must not
# notice, and everything they wrote must be there.
ublk_round() {
    u=$1
    img=$2
    shift 2
    opts="--key-file /key --queues 2 --queue-depth 32 --max-io-kib 256 $*"
    export RUST_LOG=crypt_vfio=info
    step $u-open crypt-vfio open $opts --log-file /run/$u.log --pidfile /run/$u.pid $img || return
    dev=$(tail -1 /tmp/out)
    b=${dev##*/}
    step $u-bs sh -c "test \$(cat /sys/block/$b/queue/logical_block_size) = 4096 && \
        grep -q 'write back' /sys/block/$b/queue/write_cache && test \$(cat /sys/block/$b/queue/fua) = 1"
    step $u-mkfs /tools/bin/mke2fs -q -F -t ext4 -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 $dev
    mkdir -p /mnt/$u
    step $u-mount mount -t ext4 $dev /mnt/$u || return
    step $u-write cp -a /tree /mnt/$u/t1
    step $u-sync sync
    # The writers: a tree copy and one large file, each ending with sync.
    rm -f /run/$u.w1 /run/$u.w2
    (cp -a /tree /mnt/$u/t2 && sync; echo $? >/run/$u.w1) &
    (all_files >/mnt/$u/big && sync; echo $? >/run/$u.w2) &
    old=$(cat /run/$u.pid)
    # The kill must land with requests on the server, or the reissue is not exercised: the
    # count is read right before the kill (the requeued requests no longer count after it).
    i=0
    n=0
    while [ $n = 0 ] && [ $i -lt 5000 ]; do
        n=$(inflight $b)
        [ $n != 0 ] || usleep 1000
        i=$((i + 1))
    done
    kill -9 $old
    echo "=== $u-kill: kill -9 $old with $n requests in flight [$(uptime_s) s]"
    [ $n -gt 0 ] || failed $u-kill "nothing was in flight at the kill"
    if [ -e /run/$u.w1 ] && [ -e /run/$u.w2 ]; then failed $u-kill "the writers finished before the kill"; fi
    while ! gone $old; do usleep 1000; done
    echo "=== $u-killed: server gone [$(uptime_s) s]"
    # The same image with another key or access mode must not take the device over.
    refused $u-recover-ro "read-only" crypt-vfio open --foreground --recover $dev --read-only $opts $img
    refused $u-recover-key "another key" crypt-vfio open --foreground --recover $dev --plain \
        --volume-key-file /run/otherkey --sector-size 4096 --device software $img
    step $u-recover crypt-vfio open --recover $dev $opts --log-file /run/$u-recover.log --pidfile /run/$u.pid $img
    echo "=== $u-recovered: $(inflight $b) requests in flight [$(uptime_s) s]"
    grep -h "ms\]" /run/$u-recover.log
    i=0
    while { [ ! -e /run/$u.w1 ] || [ ! -e /run/$u.w2 ]; } && [ $i -lt 1200 ]; do usleep 100000; i=$((i + 1)); done
    step $u-writers sh -c "test \$(cat /run/$u.w1) = 0 && test \$(cat /run/$u.w2) = 0"
    step $u-diff diff -r /tree /mnt/$u/t2
    step $u-big sh -c "find /tree -type f | sort | xargs cat | cmp - /mnt/$u/big"
    refused $u-close-mounted "in use" crypt-vfio close $dev
    # SIGTERM while mounted is refused as close is: the server stays, the filesystem works.
    kill -TERM $(cat /run/$u.pid)
    sleep 1
    step $u-term-mounted sh -c "kill -0 $(cat /run/$u.pid) && test -b $dev && ls /mnt/$u/t2 >/dev/null && \
        grep -q 'is in use (mounted?): not stopping it' /run/$u-recover.log"
    step $u-umount umount /mnt/$u
    step $u-fsck /tools/bin/e2fsck -fn $dev
}

# --- ublk, through the VFIO-bound device -----------------------------------------------------
# A plain dm-crypt key that is not the volume's.
printf '%064d' 7 >/run/otherkey
A_IMG=$(disk lk-vfio)
B_IMG=$(disk lk-emu)
ublk_round a $A_IMG --device $BDF
# The refusals, while /dev/ublkb0 is live: another server of its image (which its server holds),
# another volume.
refused a-recover-live "is in use by another program" crypt-vfio open --foreground --recover $dev \
    --key-file /key --device software $A_IMG
refused a-open-again "is in use by another program" crypt-vfio open --key-file /key --device software $A_IMG
refused a-recover-other "recovering onto another volume would corrupt it" crypt-vfio open --foreground \
    --recover $dev --key-file /key --device software $B_IMG
step a-close crypt-vfio close $dev
step a-gone sh -c "test ! -e $dev && test ! -e /sys/block/$b"
step a-server-gone gone $(cat /run/a.pid)
cat /run/a.log /run/a-recover.log

# --- ublk, through the software engine --------------------------------------------------------
ublk_round b $B_IMG --device software
# Unmounted, SIGTERM stops the device as close does.
old=$(cat /run/b.pid)
kill -TERM $old
i=0
while ! gone $old && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
step b-term sh -c "test ! -e $dev && test ! -e /sys/block/$b"
cat /run/b-recover.log

# --- ublk read-only, and close after the server died (nothing to recover) ---------------------
# From the image's directory, by a relative name: the daemon works from / (so that it keeps no
# file system busy) and must still find its image.
step c-open sh -c "cd ${B_IMG%/*} && crypt-vfio open --read-only --key-file /key --device software \
    --pidfile /run/c.pid ${B_IMG##*/}"
dev=$(tail -1 /tmp/out)
b=${dev##*/}
step c-cwd sh -c "test \$(readlink /proc/\$(cat /run/c.pid)/cwd) = /"
step c-ro sh -c "test \$(cat /sys/block/$b/ro) = 1"
step c-read sh -c "mount -t ext4 -o ro $dev /mnt/b && diff -r /tree /mnt/b/t2 && umount /mnt/b"
old=$(cat /run/c.pid)
kill -9 $old
while ! gone $old; do usleep 1000; done
step c-close-dead crypt-vfio close $dev
step c-gone sh -c "test ! -e $dev && test ! -e /sys/block/$b"

# --- NBD: crypt-vfio attaches /dev/nbd0 itself, through the VFIO-bound device ----------------
NBD_IMG=$(disk lk-nbd)
step nbd-open crypt-vfio open --nbd /dev/nbd0 --key-file /key --device $BDF --log-file /run/nbd.log \
    --pidfile /run/nbd.pid $NBD_IMG
step nbd-backend grep -q "^crypt-vfio:" /sys/block/nbd0/backend
# Flush, FUA and discard reach the server (the kernel only sends them when told it may).
step nbd-flags sh -c "grep -q 'write back' /sys/block/nbd0/queue/write_cache && \
    test \$(cat /sys/block/nbd0/queue/fua) = 1 && test \$(cat /sys/block/nbd0/queue/discard_max_bytes) != 0"
fs_round nbd /dev/nbd0
mount -t ext4 /dev/nbd0 /mnt/nbd
refused nbd-close-mounted "in use" crypt-vfio close /dev/nbd0
umount /mnt/nbd
step nbd-close crypt-vfio close /dev/nbd0
step nbd-server-gone gone $(cat /run/nbd.pid)
# Reopened: what the first server wrote is there.
step nbd-reopen crypt-vfio open --nbd any --key-file /key --device $BDF --log-file /run/nbd.log $NBD_IMG
step nbd-reread sh -c "mount -t ext4 -o ro /dev/nbd0 /mnt/nbd && diff -r /tree /mnt/nbd/t1 && umount /mnt/nbd"
step nbd-close-again crypt-vfio close /dev/nbd0
cat /run/nbd.log

# --- The kernel's own NBD client (nbd-client) against `crypt-vfio serve` ----------------------
crypt-vfio serve --socket /run/n.sock --key-file /key --device $BDF $NBD_IMG >/run/serve.log 2>&1 &
spid=$!
i=0
while [ ! -S /run/n.sock ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
step nbdc-connect /tools/bin/nbd-client -u /run/n.sock /dev/nbd1 -b 4096 -t 60
step nbdc-bs sh -c "test \$(cat /sys/block/nbd1/queue/logical_block_size) = 4096"
mkdir -p /mnt/nbdc
step nbdc-mount mount -t ext4 /dev/nbd1 /mnt/nbdc
step nbdc-diff diff -r /tree /mnt/nbdc/t1
step nbdc-write cp -a /tree /mnt/nbdc/t3
step nbdc-sync sync
# Read back through the server, not the page cache (the host checks t3 outside too).
echo 3 >/proc/sys/vm/drop_caches
step nbdc-diff-t3 diff -r /tree /mnt/nbdc/t3
step nbdc-umount umount /mnt/nbdc
step nbdc-fsck /tools/bin/e2fsck -fn /dev/nbd1
step nbdc-disconnect /tools/bin/nbd-client -d /dev/nbd1
kill -TERM $spid
wait $spid
rc=$?
cat /run/serve.log
[ $rc = 0 ] || failed serve-exit "crypt-vfio serve exited with status $rc after SIGTERM"

# --- fio: ublk and NBD through the device and the software engine, and dm-crypt itself ----------
# bench NAME DEV: the jobs of /bench.fio on DEV, one `FIO` line per job for the host to tabulate.
bench() {
    echo "=== fio-$1: $2 [$(uptime_s) s]"
    if /tools/bin/fio --output-format=terse --terse-version=3 --filename=$2 /bench.fio >/tmp/fio 2>/tmp/fio.err; then
        # terse v3: 3 job, 7/8/40 read KiB/s, IOPS, mean latency (us); 48/49/81 the same for writes
        awk -F';' -v t=$1 '{ printf "FIO %s %s %s %s %s %s %s %s\n", t, $3, $7, $8, $40, $48, $49, $81 }' /tmp/fio
    else
        cat /tmp/fio.err
        failed fio-$1 "fio failed on $2"
    fi
}
. /bench.env
if [ "$FIO" = 1 ]; then
    BENCH_IMG=$(disk lk-bench)
    for engine in vfio software; do
        dev_opt=$BDF
        [ $engine = software ] && dev_opt=software
        if step fio-open-ublk-$engine crypt-vfio open --key-file /key --max-io-kib 256 --device $dev_opt $BENCH_IMG; then
            d=$(tail -1 /tmp/out)
            bench ublk-$engine $d
            step fio-close-ublk-$engine crypt-vfio close $d
        fi
    done
    # --workers is per connection for NBD: 2 connections x 2 = the 4 workers ublk has in all,
    # so that both run the volume with the same concurrency.
    if step fio-open-nbd crypt-vfio open --nbd any --workers 2 --key-file /key --device $BDF $BENCH_IMG; then
        d=$(tail -1 /tmp/out)
        bench nbd-vfio $d
        step fio-close-nbd crypt-vfio close $d
    fi
    # dm-crypt: the kernel's own, as cryptsetup opens it (no udev here: libdevmapper is told so).
    mkdir -p /run/cryptsetup
    export DM_DISABLE_UDEV=1
    if step fio-open-dmcrypt /tools/bin/cryptsetup open --key-file /key $BENCH_IMG bench; then
        bench dm-crypt /dev/mapper/bench
        step fio-close-dmcrypt /tools/bin/cryptsetup close bench
    fi
fi

errs=$(kernel_errors)
[ -z "$errs" ] || failed kernel-log "$errs"
step unbind crypt-vfio unbind $BDF
verdict crypt-vfio-block-guest
