# shellcheck shell=sh
# Step helpers for a guest's /init (busybox sh): each step is logged as `=== NAME: ok|FAILED (why)`
# with the guest's uptime, and the first failure becomes the run's reason. Sourced by the /init
# scripts the guest tests put into their initramfs.

result=PASS
reason=
uptime_s() { cut -d' ' -f1 /proc/uptime; }
failed() {
    echo "=== $1: FAILED ($2) [$(uptime_s) s]"
    if [ $result = PASS ]; then reason="$1: $2"; fi
    result=FAIL
}
# step NAME COMMAND...: the command must succeed; on failure its last error line is the reason.
# Where the init sets STEP_FORBID (a grep pattern), a step that prints it fails too, for the
# reason STEP_FORBID_WHY; where it sets STEP_WHY (a grep -E pattern), the first line that matches
# it is the reason before the last error line.
step() {
    name=$1
    shift
    echo "=== $name: $* [$(uptime_s) s]"
    "$@" >/tmp/out 2>&1
    rc=$?
    cat /tmp/out
    if [ $rc = 0 ] && [ -n "${STEP_FORBID:-}" ] && grep -q "$STEP_FORBID" /tmp/out; then
        failed "$name" "$STEP_FORBID_WHY"
        rc=1
    elif [ $rc = 0 ]; then
        echo "=== $name: ok [$(uptime_s) s]"
    else
        why=
        [ -z "${STEP_WHY:-}" ] || why=$(grep -E "$STEP_WHY" /tmp/out | head -1)
        [ -n "$why" ] || why=$(grep -E "^crypt-vfio: |rror" /tmp/out | tail -1)
        failed "$name" "${why:-exit status $rc}"
    fi
    return $rc
}
# refused NAME TEXT COMMAND...: the command must fail and say TEXT.
refused() {
    name=$1
    text=$2
    shift 2
    echo "=== $name: $* [$(uptime_s) s]"
    out=$("$@" 2>&1)
    rc=$?
    echo "$out"
    if [ $rc = 0 ]; then failed "$name" "succeeded, should have been refused"
    elif ! echo "$out" | grep -q "$text"; then failed "$name" "refused without saying '$text'"
    else echo "=== $name: refused as it should be"; fi
}
# verdict TAG: the line the host reads, then power off.
verdict() {
    echo "$1: $result${reason:+: $reason}"
    poweroff -f
}
