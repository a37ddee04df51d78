#!/usr/bin/env bash
# The block-device guest test: crypt-vfio's decrypted volumes as kernel block devices (ublk and
# the kernel's NBD client), with an ext4 filesystem on them, in a QEMU guest on Debian 13's 6.12
# kernel (Debian 12's 6.1 has neither ublk nor, as modules, what this needs), through QEMU's
# virtio-crypto device bound to vfio-pci and through the software engine.
#
# On the host (root, Debian 12): LUKS2 images made by cryptsetup (the guest has no cryptsetup);
# in the guest (tools/guest/block-init.sh): open, mkfs.ext4, mount, write a tree of files, sync,
# unmount, e2fsck clean, close; after the guest, on the host again: every image is decrypted by
# an independent implementation (tools/dmcrypt_ref.py, with the volume key from `cryptsetup
# luksDump --dump-volume-key`), fsck'd, and its files read back with debugfs and compared with
# the tree the guest wrote. Prints
#   block-guest-test: PASS (...)   or   block-guest-test: FAIL (reason)
#
# Like tools/vfio-guest-test.sh it installs nothing (tools/guest/rig.sh fetches what is missing
# under target/block-guest, and the 6.12 kernel through a private apt state there).
#
# Environment:
#   BLOCK_GUEST_TIMEOUT=N   seconds the guest may run (default 600)
#   BLOCK_GUEST_FIO=0       skip the fio numbers (ublk and NBD through the device and the software
#                           engine, and dm-crypt, on one more image)
#   FIO_RT=N                seconds each fio job runs (default 3)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RIG_NAME=block-guest-test
RIG_WORK=${CARGO_TARGET_DIR:-$ROOT/target}/block-guest
TIMEOUT=${BLOCK_GUEST_TIMEOUT:-600}
# shellcheck source=tools/guest/rig.sh
. "$ROOT/tools/guest/rig.sh"
START=$(date +%s)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

rig_begin
for t in cryptsetup debugfs e2fsck mke2fs python3; do
    command -v $t >/dev/null || rig_fail "needs $t on the host (cryptsetup-bin, e2fsprogs, python3)"
done
python3 -c "import cryptography" 2>/dev/null || rig_fail "needs python3-cryptography on the host (tools/dmcrypt_ref.py)"
rig_tools
# vfio-pci and what it needs; ublk and the NBD client; virtio disks, ext4 and its checksums
# (the kernel would request crc32c through modprobe, which the initramfs does not have).
# dm-crypt and XTS for the anchor of the fio numbers.
rig_kernel trixie irqbypass vfio vfio_iommu_type1 vfio-pci-core vfio-pci ublk_drv nbd virtio_blk ext4 crc32c_generic \
    dm-crypt xts
# The guest's userland beyond busybox: the host's e2fsprogs and cryptsetup, and Debian 12's fio and
# nbd-client (unpacked, not installed), each with the libraries it links.
GUEST_PKGS=$RIG_WORK/guest-pkgs
rig_unpack "$GUEST_PKGS" fio nbd-client
GR=$GUEST_PKGS/root
GUEST_LIBS=$GR/lib/x86_64-linux-gnu:$GR/usr/lib/x86_64-linux-gnu:$GR/usr/lib/x86_64-linux-gnu/ceph

rig_say "building crypt-vfio statically"
rig_static_build "$ROOT" "$RIG_WORK/build.log"

# --- Host preparation: images, the tree, the initramfs ---------------------------------------
IMGS=$RIG_WORK/images
rm -rf "$IMGS" && mkdir -p "$IMGS"
printf 'block-guest passphrase' >"$IMGS/key"
FIO=${BLOCK_GUEST_FIO:-1}
DISKS=(lk-vfio lk-emu lk-nbd)
ALL_DISKS=("${DISKS[@]}")
[ "$FIO" = 0 ] || ALL_DISKS+=(lk-bench)
for d in "${ALL_DISKS[@]}"; do
    if [ $d = lk-bench ]; then truncate -s 128M "$IMGS/$d.img"; else truncate -s 64M "$IMGS/$d.img"; fi
    # 4096-byte sectors (the block device's logical block size), a cheap KDF (the guest is slow).
    cryptsetup luksFormat -q --type luks2 --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
        --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --luks2-metadata-size 16k --luks2-keyslots-size 1m \
        "$IMGS/$d.img" "$IMGS/key" >/dev/null 2>&1 || rig_fail "cryptsetup luksFormat $d failed"
done

INITRD=$RIG_WORK/initramfs
rm -rf "$INITRD" && mkdir -p "$INITRD"/tools/{bin,lib} "$INITRD"/{bin,lib64}
cp "$RIG_BIN" "$INITRD/bin/crypt-vfio"
cp "$ROOT/tools/guest/block-init.sh" "$INITRD/init"
cp "$ROOT/tools/guest/steps.sh" "$INITRD/steps.sh"
chmod +x "$INITRD/init"
cp "$IMGS/key" "$INITRD/key"
# busybox's mke2fs applet makes no ext4 with a journal and checksums, and it has no e2fsck.
for t in "$(command -v mke2fs)" "$(command -v e2fsck)" "$(command -v cryptsetup)" "$GR/usr/bin/fio" "$GR/sbin/nbd-client"; do
    cp "$t" "$INITRD/tools/bin/"
    libs=$(LD_LIBRARY_PATH=$GUEST_LIBS ldd "$t") || rig_fail "ldd $t failed"
    ! echo "$libs" | grep "not found" || rig_fail "$t lacks libraries (above)"
    for lib in $(echo "$libs" | awk '/=> \// { print $3 }'); do cp -L "$lib" "$INITRD/tools/lib/"; done
done
cp "$ROOT/tools/guest/bench.fio" "$INITRD/bench.fio"
echo "FIO=$FIO; export FIO_RT=${FIO_RT:-3}" >"$INITRD/bench.env"
cp -L /lib64/ld-linux-x86-64.so.2 "$INITRD/lib64/"
# The tree the guest writes: deterministic, files of 1 byte to 256 KiB.
python3 "$ROOT/tools/guest/tree.py" "$INITRD/tree" 7 200
# What the big writer writes: every file of the tree, in sorted path order.
(cd "$INITRD" && find tree -type f | LC_ALL=C sort | xargs cat) >"$IMGS/big"
rig_initramfs "$INITRD" "$RIG_WORK/initrd.cpio"

# --- The guest ------------------------------------------------------------------------------
LOG=$RIG_WORK/guest.log
drives=()
for d in "${ALL_DISKS[@]}"; do
    drives+=(-drive "file=$IMGS/$d.img,format=raw,if=none,id=$d,cache=unsafe"
        -device "virtio-blk-pci,drive=$d,serial=$d")
done
rig_say "booting $RIG_KPKG under $RIG_QEMU_VERSION (TCG)"
boot_start=$(date +%s)
set +e
rig_qemu "$TIMEOUT" "$LOG" "$RIG_WORK/initrd.cpio" -m 1536 -smp 2 \
    -append "console=ttyS0 panic=-1 quiet intel_iommu=on" \
    -device intel-iommu,intremap=on,device-iotlb=off \
    -object cryptodev-backend-builtin,id=cryptodev0 \
    -device virtio-crypto-pci,id=crypto0,cryptodev=cryptodev0,iommu_platform=on,disable-legacy=on \
    "${drives[@]}"
qemu_rc=$?
set -e
guest_s=$(($(date +%s) - boot_start))
tr -d '\r' <"$LOG" | sed 's/^/  guest| /' || true
[ -s "$LOG.qemu" ] && sed 's/^/  qemu| /' "$LOG.qemu"
verdict=$(tr -d '\r' <"$LOG" 2>/dev/null | grep -a "^crypt-vfio-block-guest: " | tail -1 || true)
case $verdict in
    "crypt-vfio-block-guest: PASS"*) ;;
    "crypt-vfio-block-guest: FAIL"*) rig_fail "in the guest, ${verdict#crypt-vfio-block-guest: FAIL: }" ;;
    *)
        [ $qemu_rc != 124 ] || rig_fail "the guest did not finish within ${TIMEOUT} s"
        rig_fail "the guest did not boot or did not finish (QEMU exit status $qemu_rc); see $LOG"
        ;;
esac

# --- The fio table ----------------------------------------------------------------------------
if [ "$FIO" != 0 ]; then
    tr -d '\r' <"$LOG" | grep -a "^FIO " | awk '
        BEGIN { print "| target | job | MB/s | IOPS | mean latency (ms) |"; print "| --- | --- | --- | --- | --- |" }
        { r = ($5 > 0) ? 1 : 0
          bw = r ? $4 : $7; iops = r ? $5 : $8; lat = r ? $6 : $9
          printf "| %s | %s | %.1f | %d | %.2f |\n", $2, $3, bw * 1024 / 1e6, iops, lat / 1000 }' \
        >"$RIG_WORK/fio.md"
    rig_say "fio in the guest (TCG, ${FIO_RT:-3} s per job; load: $(cut -d' ' -f1-3 /proc/loadavg)):"
    cat "$RIG_WORK/fio.md"
fi

# --- Outside: an independent decryption of every image, fsck, and the files read back --------
for d in "${DISKS[@]}"; do
    rig_say "checking $d outside the guest"
    pairs=("/t1:$INITRD/tree")
    # The ublk rounds also wrote, across a server kill, a second tree and one large file.
    [ $d = lk-nbd ] || pairs+=("/t2:$INITRD/tree" "/big:$IMGS/big")
    # nbd-client against `serve` wrote a third tree on the NBD image.
    [ $d != lk-nbd ] || pairs+=("/t3:$INITRD/tree")
    python3 "$ROOT/tools/guest/outside_check.py" "$IMGS/$d.img" "$IMGS/key" "$INITRD/tree" "$IMGS/$d.out" "${pairs[@]}" ||
        rig_fail "$d: the image written in the guest does not read back outside it (above)"
    rm -rf "$IMGS/$d.out"
done
rig_packages_unchanged || rig_fail "dpkg -l changed during the test; the difference is above"
rig_say "PASS (guest $RIG_KVER, $RIG_QEMU_VERSION; guest ran ${guest_s} s, whole test $(($(date +%s) - START)) s; dpkg -l unchanged)"
rm -rf "$IMGS"
