# shellcheck shell=bash
# The guest rig shared by the guest tests: Debian's tools and kernels fetched without installing
# anything, a busybox initramfs, and one QEMU (TCG) run whose verdict is read from the console.
#
# Sourced, not run. The caller sets RIG_NAME (the prefix of its messages) and RIG_WORK (a directory
# under target/ that holds everything fetched and built), then calls, in order:
#   rig_begin                     checks the machine, records `dpkg -l` (compared again on exit)
#   rig_tools PKG-FOR-CMD...      QEMU, busybox, cpio and the named extra tools, installed or unpacked
#   rig_kernel SUITE MODULE...    a Debian kernel (vmlinux) and the named modules with their
#                                 dependencies, in load order (RIG_KDIR, RIG_KVER, RIG_MODULES)
#   rig_qemu LOG ARGS...          boots RIG_KDIR/vmlinux with the given initramfs and devices
#
# It never installs, removes, upgrades or downgrades a package: a tool that is not installed comes
# from `apt-get download` and `dpkg -x` under RIG_WORK. A kernel of another Debian release (trixie's
# 6.12 has ublk and nbd, bookworm's 6.1 has neither) comes through a private apt state under
# RIG_WORK (its own sources, lists and cache), so the host's apt lists stay as they were.

rig_fail() {
    echo "$RIG_NAME: FAIL ($*)"
    exit 1
}
rig_say() { echo "$RIG_NAME: $*"; }

# --- The machine's packages: the same after the test as before it --------------------------------
rig_packages_unchanged() {
    dpkg -l >"$RIG_WORK/dpkg-after.txt"
    if ! diff -u "$RIG_WORK/dpkg-before.txt" "$RIG_WORK/dpkg-after.txt" >"$RIG_WORK/dpkg.diff"; then
        cat "$RIG_WORK/dpkg.diff"
        return 1
    fi
}
rig_on_exit() {
    rc=$?
    trap - EXIT
    if [ $rc != 0 ] && ! rig_packages_unchanged; then
        echo "$RIG_NAME: FAIL (dpkg -l changed during the test; the difference is above)"
    fi
    exit $rc
}
rig_begin() {
    [ "$(id -u)" = 0 ] || rig_fail "must run as root (apt-get update, device nodes in the guest images)"
    [ "$(uname -m)" = x86_64 ] || rig_fail "needs an x86_64 machine"
    command -v apt-get >/dev/null && command -v dpkg >/dev/null || rig_fail "needs a Debian machine (apt-get, dpkg)"
    mkdir -p "$RIG_WORK"
    dpkg -l >"$RIG_WORK/dpkg-before.txt"
    trap rig_on_exit EXIT
}

# --- Tools: the installed ones, or Debian's packages unpacked under RIG_WORK (never installed) -----
rig_apt_updated=0
rig_apt_update() {
    if [ $rig_apt_updated = 0 ]; then
        # Refreshes apt's package lists only; it changes no installed package.
        apt-get update -q >"$RIG_WORK/apt.log" 2>&1 || { cat "$RIG_WORK/apt.log"; rig_fail "apt-get update failed"; }
        rig_apt_updated=1
    fi
}
rig_installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
RIG_PKGROOT=
RIG_LIBDIRS=
# Runs a tool with the unpacked libraries first on its search path.
rig_with_libs() { LD_LIBRARY_PATH=$RIG_LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$@"; }
# Where a tool is: installed (on PATH) or unpacked.
rig_tool_path() {
    command -v "$1" 2>/dev/null ||
        { for d in usr/bin bin usr/sbin sbin; do [ -x "$RIG_PKGROOT/$d/$1" ] && echo "$RIG_PKGROOT/$d/$1" && return; done; }
}

# rig_unpack DIR PKG...: PKG and its dependency closure (less what is installed, unless
# RIG_UNPACK_ALL=1) unpacked into DIR/root; reused while Debian's versions stay the same.
rig_unpack() {
    local dir=$1 closure fetch=() uris stamp p deb
    shift
    apt-cache show "$@" >/dev/null 2>&1 || rig_apt_update
    apt-cache show "$@" >/dev/null 2>&1 || rig_fail "apt knows no package among $*; cannot fetch them"
    closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$@" | grep -v '^[ <]' | sort -u)
    for p in $closure; do
        if [ "${RIG_UNPACK_ALL:-0}" = 1 ] || ! rig_installed "$p"; then fetch+=("$p"); fi
    done
    [ ${#fetch[@]} -gt 0 ] || rig_fail "$*: installed as packages, yet not on PATH"
    uris=$(apt-get download --print-uris "${fetch[@]}" 2>"$RIG_WORK/apt-download.log") ||
        { cat "$RIG_WORK/apt-download.log"; rig_fail "apt-get download --print-uris ${fetch[*]} failed"; }
    stamp=$(echo "$uris" | awk '{ print $2 }' | sort)
    if [ "$stamp" != "$(cat "$dir/fetched" 2>/dev/null)" ]; then
        rig_say "fetching $* and ${#fetch[@]} packages they need into $dir (nothing is installed)"
        rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/root"
        (cd "$dir/debs" && apt-get download "${fetch[@]}" >"$dir/download.log" 2>&1) ||
            { rig_apt_update; (cd "$dir/debs" && apt-get download "${fetch[@]}" >"$dir/download.log" 2>&1); } ||
            { tail -20 "$dir/download.log"; rig_fail "apt-get download ${fetch[*]} failed"; }
        for deb in "$dir"/debs/*.deb; do
            dpkg -x "$deb" "$dir/root" || rig_fail "dpkg -x $deb failed"
        done
        rm -rf "$dir/debs"
        echo "$stamp" >"$dir/fetched"
    fi
}

# rig_tools [PKG:CMD]...: sets RIG_QEMU, RIG_QEMU_DIRS, RIG_QEMU_VERSION, RIG_CPIO, RIG_BUSYBOX, and
# makes every CMD runnable (rig_tool_path CMD) by unpacking PKG when CMD is missing.
rig_tools() {
    local want=() pc t missing d
    command -v qemu-system-x86_64 >/dev/null || want+=(qemu-system-x86)
    # The initramfs needs a static busybox: Debian's busybox package is dynamically linked.
    rig_installed busybox-static || want+=(busybox-static)
    command -v cpio >/dev/null || want+=(cpio)
    command -v xz >/dev/null || want+=(xz-utils)
    command -v zstd >/dev/null || want+=(zstd)
    for pc in "$@"; do command -v "${pc#*:}" >/dev/null || want+=("${pc%%:*}"); done
    RIG_PKGROOT=$RIG_WORK/pkgs/root
    RIG_LIBDIRS=$RIG_PKGROOT/lib/x86_64-linux-gnu:$RIG_PKGROOT/usr/lib/x86_64-linux-gnu
    [ ${#want[@]} = 0 ] || rig_unpack "$RIG_WORK/pkgs" "${want[@]}"
    RIG_QEMU=$(rig_tool_path qemu-system-x86_64) || true
    [ -n "$RIG_QEMU" ] || rig_fail "no qemu-system-x86_64, installed or in $RIG_PKGROOT"
    RIG_CPIO=$(rig_tool_path cpio) || true
    [ -n "$RIG_CPIO" ] || rig_fail "no cpio, installed or in $RIG_PKGROOT"
    if rig_installed busybox-static; then RIG_BUSYBOX=/bin/busybox; else RIG_BUSYBOX=$RIG_PKGROOT/bin/busybox; fi
    [ -x "$RIG_BUSYBOX" ] || rig_fail "no static busybox at $RIG_BUSYBOX"
    for t in "$RIG_QEMU" "$RIG_CPIO" $(rig_tool_path xz) $(rig_tool_path zstd); do
        missing=$(rig_with_libs ldd "$t" 2>&1 | grep "not found" || true)
        [ -z "$missing" ] || { echo "$missing"; rig_fail "$t lacks libraries (above)"; }
    done
    # An unpacked QEMU finds its firmware (-L) and its modules (TCG is one) under RIG_WORK, not /usr.
    RIG_QEMU_DIRS=()
    case $RIG_QEMU in
        "$RIG_PKGROOT"/*)
            for d in usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu; do RIG_QEMU_DIRS+=(-L "$RIG_PKGROOT/$d"); done
            export QEMU_MODULE_DIR=$RIG_PKGROOT/usr/lib/x86_64-linux-gnu/qemu
            ;;
    esac
    RIG_QEMU_VERSION=$(rig_with_libs "$RIG_QEMU" --version | head -1) || rig_fail "$RIG_QEMU does not run"
}

# --- A Debian kernel of any suite ----------------------------------------------------------------
# rig_apt_suite SUITE: sets RIG_APT to the apt-get/apt-cache options of a private apt state that
# knows SUITE (and SUITE-security) from the mirrors the host already uses; its lists and cache live
# under RIG_WORK, so the host's own lists are not touched. The host's own suite needs none.
rig_apt_suite() {
    local suite=$1 dir=$RIG_WORK/apt-$1 main sec
    RIG_APT=()
    [ "$suite" = "$(. /etc/os-release && echo "$VERSION_CODENAME")" ] && return 0
    # The mirror URIs the host's sources name (no host name is written into the repository).
    main=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 !~ /-/ { print $1; exit }')
    sec=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 ~ /-security$/ { print $1; exit }')
    [ -n "$main" ] || { rig_apt_update; main=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 !~ /-/ { print $1; exit }'); }
    [ -n "$main" ] || rig_fail "the host's apt sources name no Debian mirror (apt-get indextargets)"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/parts"
    {
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $main $suite main"
        [ -z "$sec" ] || echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $sec $suite-security main"
    } >"$dir/sources.list"
    RIG_APT=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=$dir/parts"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache")
    # Lists older than a day are refreshed: a kernel point release replaces the old package.
    if [ -z "$(find "$dir/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        rig_say "fetching the $suite package lists into $dir (the host's apt state is not touched)"
        apt-get "${RIG_APT[@]}" update -q >"$dir/update.log" 2>&1 ||
            { tail -20 "$dir/update.log"; rig_fail "apt-get update of the private $suite state failed"; }
    fi
}

# The kernel package SUITE's linux-image-amd64 depends on (RIG_APT chooses the suite).
rig_kernel_package() {
    apt-cache "${RIG_APT[@]}" depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

# rig_kernel SUITE MODULE...: Debian SUITE's kernel as an uncompressed ELF (RIG_KDIR/vmlinux, booted
# through its PVH note), and the named modules plus every module they depend on, decompressed into
# RIG_KDIR/modules; RIG_MODULES lists them in an order busybox insmod can load them.
rig_kernel() {
    local suite=$1 kpkg deb vmlinuz off m
    shift
    rig_apt_suite "$suite"
    kpkg=$(rig_kernel_package)
    # The host's own suite is read from the host's lists, which may be missing or stale (a kernel
    # point release replaces the old package).
    if [ -z "$kpkg" ] && [ ${#RIG_APT[@]} = 0 ]; then
        rig_apt_update
        kpkg=$(rig_kernel_package)
    fi
    [ -n "$kpkg" ] || rig_fail "cannot tell which kernel $suite's linux-image-amd64 depends on"
    RIG_KPKG=$kpkg
    RIG_KVER=${kpkg#linux-image-}
    RIG_KDIR=$RIG_WORK/kernel-$RIG_KVER
    local want="$*"
    if [ ! -s "$RIG_KDIR/vmlinux" ] || [ "$(cat "$RIG_KDIR/wanted" 2>/dev/null)" != "$want" ]; then
        rig_say "fetching $kpkg ($suite)"
        rm -rf "$RIG_WORK"/kernel-* && mkdir -p "$RIG_KDIR/x" "$RIG_KDIR/modules"
        (cd "$RIG_KDIR" && apt-get "${RIG_APT[@]}" download "$kpkg" >"$RIG_KDIR/download.log" 2>&1) ||
            { [ ${#RIG_APT[@]} = 0 ] && rig_apt_update &&
                (cd "$RIG_KDIR" && apt-get download "$kpkg" >"$RIG_KDIR/download.log" 2>&1); } ||
            { cat "$RIG_KDIR/download.log"; rig_fail "apt-get download $kpkg failed"; }
        deb=$(ls "$RIG_KDIR"/*.deb)
        # Merged /usr (trixie) or not (bookworm): the modules are under either.
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$RIG_KDIR/x" --wildcards --no-wildcards-match-slash \
            "./boot/vmlinuz-$RIG_KVER" "*/modules/$RIG_KVER/kernel/*" 2>/dev/null ||
            dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$RIG_KDIR/x" --wildcards \
                "./boot/vmlinuz-$RIG_KVER" "*/modules/$RIG_KVER/kernel/*"
        rm -f "$deb"
        rig_resolve_modules $want
        printf '%s\n' "${RIG_MODULES[@]}" >"$RIG_KDIR/order"
        # Booting the uncompressed kernel saves seconds under TCG. The bzImage carries one compressed
        # stream: ZSTD (28 B5 2F FD, trixie) or XZ (FD 37 7A 58 5A 00, bookworm); the decompressor
        # complains about the bytes after it, which are not ours to read.
        vmlinuz=$RIG_KDIR/x/boot/vmlinuz-$RIG_KVER
        off=$(LC_ALL=C grep -obUaP '\x28\xB5\x2F\xFD' "$vmlinuz" | head -1 | cut -d: -f1) || true
        if [ -n "$off" ]; then
            tail -c +$((off + 1)) "$vmlinuz" | rig_with_libs "$(rig_tool_path zstd)" -dcq >"$RIG_KDIR/vmlinux.tmp" 2>/dev/null || true
        else
            off=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1) || true
            [ -n "$off" ] || rig_fail "no ZSTD or XZ stream in $vmlinuz"
            tail -c +$((off + 1)) "$vmlinuz" | rig_with_libs "$(rig_tool_path xz)" -dc >"$RIG_KDIR/vmlinux.tmp" 2>/dev/null || true
        fi
        [ "$(head -c 4 "$RIG_KDIR/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
            rig_fail "decompressing $vmlinuz did not give an ELF kernel"
        mv "$RIG_KDIR/vmlinux.tmp" "$RIG_KDIR/vmlinux"
        rm -rf "$RIG_KDIR/x"
        echo "$want" >"$RIG_KDIR/wanted"
    fi
    mapfile -t RIG_MODULES <"$RIG_KDIR/order"
}

# rig_resolve_modules NAME...: decompresses each named module and, first, its dependencies (the
# `depends=` of its modinfo), appending them to RIG_MODULES in load order.
RIG_MODULES=()
rig_resolve_modules() {
    local m ko dep have
    for m in "$@"; do
        for have in "${RIG_MODULES[@]}"; do [ "$have" = "$m" ] && continue 2; done
        # Module names use _ and - interchangeably; the file may use either.
        ko=$(find "$RIG_KDIR/x" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" -o -name "${m//-/_}.ko*" \) | head -1)
        [ -n "$ko" ] || rig_fail "$RIG_KPKG has no module $m"
        case $ko in
            *.xz) rig_with_libs "$(rig_tool_path xz)" -dc "$ko" >"$RIG_KDIR/modules/$m.ko" ;;
            *.zst) rig_with_libs "$(rig_tool_path zstd)" -dcq "$ko" >"$RIG_KDIR/modules/$m.ko" ;;
            *) cp "$ko" "$RIG_KDIR/modules/$m.ko" ;;
        esac
        # modinfo's own field, read without kmod: the .modinfo section holds NUL-separated key=value.
        dep=$(tr '\0' '\n' <"$RIG_KDIR/modules/$m.ko" | sed -n 's/^depends=//p' | head -1)
        # shellcheck disable=SC2086
        [ -z "$dep" ] || rig_resolve_modules ${dep//,/ }
        RIG_MODULES+=("$m")
    done
}

# rig_initramfs DIR OUT: packs DIR (which the caller filled: /init, binaries) with busybox and the
# kernel's modules (under /lib/modules, their load order in /lib/modules/order) into OUT.
rig_initramfs() {
    local dir=$1 out=$2
    mkdir -p "$dir"/{bin,dev,etc,proc,sys,tmp,run,mnt,lib/modules}
    cp "$RIG_BUSYBOX" "$dir/bin/busybox"
    cp "$RIG_KDIR"/modules/*.ko "$dir/lib/modules/"
    printf '%s\n' "${RIG_MODULES[@]}" >"$dir/lib/modules/order"
    (cd "$dir" && find . | rig_with_libs "$RIG_CPIO" -o -H newc --quiet) >"$out"
}

# rig_qemu TIMEOUT LOG INITRD QEMU-ARGS...: boots the kernel under TCG with the serial console in
# LOG; returns QEMU's exit status (124 on timeout). QEMU exits 0 whatever the guest did: the verdict
# has to be read from LOG.
rig_qemu() {
    local timeout=$1 log=$2 initrd=$3
    shift 3
    rm -f "$log"
    timeout "$timeout" env LD_LIBRARY_PATH="$RIG_LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$RIG_QEMU" "${RIG_QEMU_DIRS[@]}" -accel tcg -cpu max -machine q35 \
        -nodefaults -display none -no-reboot -serial "file:$log" \
        -kernel "$RIG_KDIR/vmlinux" -initrd "$initrd" "$@" </dev/null >"$log.qemu" 2>&1
}

# rig_static_build LOG: the crypt-vfio binary linked statically for the guest (RIG_BIN).
rig_static_build() {
    local root=$1 log=$2 triple=x86_64-unknown-linux-gnu
    RIG_BIN=${CARGO_TARGET_DIR:-$root/target}/$triple/release/crypt-vfio
    (cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target $triple \
        --bin crypt-vfio >"$log" 2>&1) || { tail -30 "$log"; rig_fail "cargo build of the static binary failed"; }
    ldd "$RIG_BIN" 2>&1 | grep -qE "not a dynamic executable|statically linked" || rig_fail "$RIG_BIN is not statically linked"
}
