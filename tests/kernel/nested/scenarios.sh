#!/bin/sh
# The nested boot's scenarios (busybox sh, run by the rig's /init in L1 when rig.boot=nested).
# Cloud Hypervisor runs on L1's /dev/kvm (nested SVM under QEMU TCG) and migrates L2 VMs that own
# mtty mdevs, driven only through `cloud-hypervisor` and `ch-remote`. L2 (tests/kernel/l2-init)
# prints `L2-TICK <n> scr=<v>/<ok|BAD|first> ...` once a second: `ok` after a migration proves
# the device's state (the UART scratch register) travelled.
#
# Environment (set by /init): CLOUD_HYPERVISOR, CH_REMOTE (patched), CLOUD_HYPERVISOR_UPSTREAM,
# CH_REMOTE_UPSTREAM, L2_KERNEL, L2_INITRAMFS; CH_SECCOMP=false passes `--seccomp false` to every
# VMM of scenarios a-g (harness development only); NESTED_ONLY="name name" runs only those;
# NESTED_VERBOSE=1 tails the logs of passing scenarios too.
# Prints `RIG-PLAN <n>`, then `RIG <name> PASS` or `RIG <name> FAIL: <reason>` per scenario (VMM
# logs tailed on FAIL). Exit status: the number of failed scenarios.
set -u
PATH=/rig:/bin:/sbin:/usr/bin:/usr/sbin
export PATH

: "${CLOUD_HYPERVISOR:?}" "${CH_REMOTE:?}" "${CLOUD_HYPERVISOR_UPSTREAM:?}" "${CH_REMOTE_UPSTREAM:?}"
: "${L2_KERNEL:?}" "${L2_INITRAMFS:?}"

ALL="ch-live-1dev ch-paused ch-snapshot-restore ch-restore-damaged ch-dest-killed ch-live-2dev-local ch-hotunplug ch-legacy-container ch-devstate ch-mixed-versions ch-vfio-user ch-vfio-user-snapshot ch-compare"
selected="${NESTED_ONLY:-$ALL}"
base=/tmp/nested
mkdir -p "$base"
ours_seccomp=""
if [ "${CH_SECCOMP:-true}" = false ]; then ours_seccomp="--seccomp false"; fi

# Step timeouts (seconds).
T_BOOT=120      # L2 boot until its first `ok` tick
T_SOCK=30       # a VMM's API socket or a receiver's socket appears
T_MIG=240       # send-migration until "Migration completed" (or a failure)
T_TICKS=90      # 3 `ok` ticks on the destination
T_EXIT=60       # a VMM exits
T_REMOTE=90     # one ch-remote call (receive-migration aside, which runs in the background)

now() { read -r up _ < /proc/uptime; echo "${up%.*}"; }
say() { echo "nested [$(now)s]: $*"; }

# A process that exists and is not a zombie (busybox sh reaps children only in `wait`).
alive() {
    [ -r "/proc/$1/stat" ] || return 1
    read -r st < "/proc/$1/stat" || return 1
    st="${st##*) }"
    [ "${st%% *}" != Z ]
}

# wait_until TIMEOUT COMMAND...: poll COMMAND every half second.
wait_until() {
    _end=$(($(now) + $1))
    shift
    while ! "$@"; do
        [ "$(now)" -lt "$_end" ] || return 1
        sleep 0.5
    done
}

# ---------------------------------------------------------------------------------------------
# Per-scenario bookkeeping: W (its directory), PIDS (killed at the end), MDEVS (removed at the
# end), NAMES (VMMs whose logs are checked and tailed), why (the failure reason).
scn_begin() {
    W="$base/$1"
    rm -rf "$W"
    mkdir -p "$W"
    PIDS=""
    MDEVS=""
    NAMES=""
    why=""
    note=""
    VM_BIN="$CLOUD_HYPERVISOR"
    VM_REMOTE="$CH_REMOTE"
    SECCOMP_ARGS="$ours_seccomp"
    VM_MEM=128M
    VM_PLATFORM=iommufd=on
    VM_EXTRA=""
}

scn_cleanup() {
    for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
    for p in $PIDS; do wait "$p" 2>/dev/null; done
    for m in $MDEVS; do
        if [ -e "$m/remove" ]; then echo 1 > "$m/remove" 2>/dev/null || say "cannot remove $m"; fi
    done
    PIDS=""
    MDEVS=""
}

# mk_mdev: a fresh mtty-1 mdev; its sysfs path in MDEV (removed at the end of the scenario).
mk_mdev() {
    if ! MDEV=$(/rig/new-mdev mtty-1); then why="cannot create an mtty-1 mdev"; return 1; fi
    MDEVS="$MDEVS $MDEV"
}

uuid_of() { echo "${1##*/}"; }

# shellcheck disable=SC2317 # called through wait_until
api_or_dead() { test -S "$W/$1.sock" || ! alive "$2"; }

# wait_api NAME PID: NAME's API socket appears (fails when the VMM exits first).
wait_api() {
    if ! wait_until "$T_SOCK" api_or_dead "$1" "$2"; then
        why="$1: no API socket after ${T_SOCK}s"
        return 1
    fi
    if ! test -S "$W/$1.sock"; then
        why="$1: the VMM exited at start: $(grep -m1 -E 'ERROR|Error|error' "$W/$1.log" "$W/$1.serial" 2>/dev/null)"
        return 1
    fi
}

# vm_start NAME MDEV...: an L2 VM with the mdevs as vfio0, vfio1, ... (VM_BIN, VM_MEM,
# VM_PLATFORM, VM_EXTRA (more options), SECCOMP_ARGS); serial in W/NAME.serial, VMM log in W/NAME.log.
vm_start() {
    _vn=$1
    shift
    _devs=""
    _i=0
    for _m in "$@"; do
        _devs="$_devs --device path=$_m,id=vfio$_i"
        _i=$((_i + 1))
    done
    _plat=""
    if [ -n "$VM_PLATFORM" ]; then _plat="--platform $VM_PLATFORM"; fi
    # shellcheck disable=SC2086 # word splitting of the option lists is intended
    set -- "$VM_BIN" --kernel "$L2_KERNEL" --initramfs "$L2_INITRAMFS" --cmdline console=ttyS0 \
        --cpus boot=1 --memory "size=$VM_MEM" --serial tty --console off \
        --api-socket "$W/$_vn.sock" $_plat $_devs $VM_EXTRA $SECCOMP_ARGS -v
    echo "$*" > "$W/$_vn.cmd"
    "$@" < /dev/null > "$W/$_vn.serial" 2> "$W/$_vn.log" &
    _pid=$!
    eval "PID_$_vn=$_pid"
    PIDS="$PIDS $_pid"
    NAMES="$NAMES $_vn"
    wait_api "$_vn" "$_pid"
}

# vmm_start NAME [ARGS...]: a VMM without a VM (a migration destination, a restore).
vmm_start() {
    _vn=$1
    shift
    # shellcheck disable=SC2086 # SECCOMP_ARGS is an option list
    set -- "$VM_BIN" --api-socket "$W/$_vn.sock" "$@" $SECCOMP_ARGS -v
    echo "$*" > "$W/$_vn.cmd"
    "$@" < /dev/null > "$W/$_vn.serial" 2> "$W/$_vn.log" &
    _pid=$!
    eval "PID_$_vn=$_pid"
    PIDS="$PIDS $_pid"
    NAMES="$NAMES $_vn"
    wait_api "$_vn" "$_pid"
}

pid_of() { eval "echo \$PID_$1"; }

# remote NAME ARGS...: ch-remote on NAME's API socket, output in W/NAME.remote (appended); a
# call that does not return within T_REMOTE seconds is killed and fails (the VMM is stuck).
remote() {
    _vn=$1
    shift
    echo "+ ch-remote $*" >> "$W/$_vn.remote"
    _t0=$(now)
    timeout "$T_REMOTE" "$VM_REMOTE" --api-socket "$W/$_vn.sock" "$@" >> "$W/$_vn.remote" 2>&1
    _rc=$?
    if [ "$_rc" != 0 ] && [ $(($(now) - _t0)) -ge "$T_REMOTE" ]; then
        echo "ch-remote $1: no answer in ${T_REMOTE}s (killed)" >> "$W/$_vn.remote"
    fi
    return "$_rc"
}

# --- L2 ticks ----------------------------------------------------------------------------------
ticks() { tr -d '\r' < "$1" | grep -E '^L2-TICK [0-9]+ '; }

# wait_ticks FILE NDEV N TIMEOUT [SKIP [REGEX [BADREGEX]]]: N ticks after the first SKIP tick
# lines in which all NDEV devices read back `ok` (or that match REGEX); fails at once on a tick
# matching BADREGEX (default: any BAD).
wait_ticks() {
    _f=$1 _nd=$2 _want=$3 _to=$4 _skip=${5:-0}
    _pat="^L2-TICK [0-9]+( scr=[0-9]+/ok){$_nd}\$"
    _badpat=BAD
    if [ $# -ge 6 ]; then _pat=$6; fi
    if [ $# -ge 7 ]; then _badpat=$7; fi
    _end=$(($(now) + _to))
    while :; do
        _bad=$(ticks "$_f" | tail -n +$((_skip + 1)) | grep -m1 -E "$_badpat")
        if [ -n "$_bad" ]; then
            why="BAD tick in ${_f##*/}: $_bad"
            return 1
        fi
        _got=$(ticks "$_f" | tail -n +$((_skip + 1)) | grep -cE "$_pat")
        [ "$_got" -ge "$_want" ] && return 0
        if [ "$(now)" -ge "$_end" ]; then
            why="${_f##*/}: $_got of $_want ticks ok on $_nd device(s) in ${_to}s (last: $(ticks "$_f" | tail -n1))"
            return 1
        fi
        sleep 1
    done
}

tick_count() { ticks "$1" | wc -l; }

# --- migrations ----------------------------------------------------------------------------------
# recv_start DST MDEV...: a destination VMM DST receiving on W/mig-DST.sock, given each MDEV's
# /dev/vfio/devices/vfioN as vfio0, vfio1, ... and a /dev/iommu fd (RECV_PLAIN=1: no fds;
# RECV_EXTRA: more receive-migration options, starting with a comma).
recv_start() {
    _d=$1
    shift
    vmm_start "$_d" || return 1
    _fds=""
    _redir="6<>/dev/iommu"
    _i=0
    _fd=5
    for _m in "$@"; do
        _v=""
        for _x in "$_m"/vfio-dev/vfio*; do [ -e "$_x" ] && _v="${_x##*/}"; done
        if [ -z "$_v" ] || [ ! -c "/dev/vfio/devices/$_v" ]; then
            why="no vfio cdev for $_m"
            return 1
        fi
        _fds="$_fds${_fds:+,}vfio$_i@$_fd"
        _redir="$_redir $_fd<>/dev/vfio/devices/$_v"
        _i=$((_i + 1))
        _fd=$((_fd + 1))
        [ "$_fd" != 6 ] || _fd=7
    done
    rm -f "$W/mig-$_d.sock"
    _url="receiver_url=unix:$W/mig-$_d.sock${RECV_EXTRA:-}"
    if [ "${RECV_PLAIN:-0}" = 1 ] || [ -z "$_fds" ]; then
        _redir=""
    else
        _url="$_url,vfio_fds=[$_fds],iommufd_fd=6"
    fi
    echo "+ ch-remote receive-migration $_url $_redir" >> "$W/$_d.remote"
    eval "\"\$VM_REMOTE\" --api-socket \"\$W/\$_d.sock\" receive-migration \"\$_url\" $_redir \
        < /dev/null >> \"\$W/\$_d.remote\" 2>&1 &"
    eval "PID_${_d}_recv=$!"
    PIDS="$PIDS $!"
    if ! wait_until "$T_SOCK" test -S "$W/mig-$_d.sock"; then
        why="$_d: the receiver did not listen on mig-$_d.sock after ${T_SOCK}s"
        return 1
    fi
}

# send SRC DST [OPTS]: ch-remote send-migration (returns at once; a worker migrates).
send() {
    if ! remote "$1" send-migration "destination_url=unix:$W/mig-$2.sock${3:+,$3}"; then
        why="send-migration failed: $(tail -n 2 "$W/$1.remote" | tr '\n' ' ')"
        return 1
    fi
}

mig_done() { grep -q 'Migration completed after' "$W/$1.log"; }
# shellcheck disable=SC2317 # called through wait_until
mig_failed() { grep -qE 'Migration failed|Probable seccomp violation|panicked' "$W/$1.log"; }
# shellcheck disable=SC2317 # called through wait_until
mig_over() { mig_done "$1" || mig_failed "$1" || ! alive "$(pid_of "$1")"; }

# wait_migration SRC: until the source logs completion; sets MIG_TOTAL_S, MIG_DOWNTIME_MS.
wait_migration() {
    if ! wait_until "$T_MIG" mig_over "$1"; then
        why="$1: migration not finished after ${T_MIG}s"
        return 1
    fi
    if ! mig_done "$1"; then
        _e=$(grep -m1 -E 'Migration failed|Probable seccomp violation|panicked|ERROR' "$W/$1.log")
        why="$1: migration failed: ${_e:-the source VMM died without a message}"
        return 1
    fi
    _l=$(grep -m1 'Migration completed after' "$W/$1.log")
    MIG_TOTAL_S=$(echo "$_l" | sed -nE 's/.*completed after ([0-9.]+)s.*/\1/p')
    MIG_DOWNTIME_MS=$(echo "$_l" | sed -nE 's/.*downtime of ([0-9]+)ms.*/\1/p')
    say "$1: migrated in ${MIG_TOTAL_S}s, downtime ${MIG_DOWNTIME_MS}ms"
}

# wait_exit NAME: the VMM exits within T_EXIT; sets EXIT_RC.
wait_exit() {
    _p=$(pid_of "$1")
    if ! wait_until "$T_EXIT" eval "! alive $_p"; then
        why="$1: still running ${T_EXIT}s later"
        return 1
    fi
    wait "$_p"
    EXIT_RC=$?
}

# migrate_1 SRC DST MDEV_DST... [-- OPTS]: receive on DST, send from SRC, wait for completion,
# then 3 ok ticks on DST with as many devices as MDEVs given.
migrate_verify() {
    _src=$1 _dst=$2 _opts=$3
    shift 3
    recv_start "$_dst" "$@" || return 1
    send "$_src" "$_dst" "$_opts" || return 1
    wait_migration "$_src" || return 1
    wait_ticks "$W/$_dst.serial" "$#" 3 "$T_TICKS" || return 1
}

# The source of a finished migration exits by itself (Cloud Hypervisor shuts the VM down and
# exits the VMM); it must exit 0 without an ERROR line.
source_exits_clean() {
    wait_exit "$1" || return 1
    if [ "$EXIT_RC" != 0 ]; then why="$1: exited $EXIT_RC after the migration"; return 1; fi
    _e=$(grep -m1 ' ERROR:' "$W/$1.log")
    if [ -n "$_e" ]; then why="$1: $_e"; return 1; fi
}

# Fails on a seccomp kill or a panic in any VMM log of the scenario.
check_logs() {
    for _ln in $NAMES; do
        _e=$(cat "$W/$_ln.log" "$W/$_ln.remote" 2>/dev/null \
            | grep -m1 -iE 'seccomp violation|SIGSYS|panicked')
        if [ -n "$_e" ]; then why="$_ln: $_e"; return 1; fi
    done
}

tail_logs() {
    for _ln in $NAMES; do
        for _f in "$W/$_ln.log" "$W/$_ln.remote" "$W/$_ln.serial"; do
            [ -s "$_f" ] || continue
            echo "---- ${_f##*/} (last 12 lines)"
            tr -d '\r' < "$_f" | tail -n 12 | sed 's/^/  | /'
        done
    done
}

# =================================================================================================
# a. Pre-copy live migration of one mtty, iommufd + vfio_fds, fresh destination mdev.
scn_ch_live_1dev() {
    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    vm_start src "$ms" || return 1
    wait_ticks "$W/src.serial" 1 1 "$T_BOOT" || return 1
    migrate_verify src dst "" "$md" || return 1
    source_exits_clean src || return 1
    note="downtime ${MIG_DOWNTIME_MS}ms, total ${MIG_TOTAL_S}s"
}

# a2. A VM paused before send-migration: its device goes STOP -> STOP_COPY -> STOP (no pre-copy,
# never running), the destination VM arrives paused (no ticks), and after `resume` there L2 reads
# back the scratch value it wrote on the source.
scn_ch_paused() {
    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    vm_start src "$ms" || return 1
    wait_ticks "$W/src.serial" 1 1 "$T_BOOT" || return 1
    remote src pause || { why="pause failed: $(tail -n 1 "$W/src.remote")"; return 1; }
    _n=$(tick_count "$W/src.serial")
    recv_start dst "$md" || return 1
    send src dst "" || return 1
    wait_migration src || return 1
    if [ "$(tick_count "$W/src.serial")" -gt $((_n + 1)) ]; then
        why="the paused source ticked on: $(ticks "$W/src.serial" | tail -n 1)"
        return 1
    fi
    sleep 3
    if [ "$(tick_count "$W/dst.serial")" -gt 0 ]; then
        why="the destination ran before resume: $(ticks "$W/dst.serial" | head -n 1)"
        return 1
    fi
    remote dst resume || { why="dst: resume failed: $(tail -n 1 "$W/dst.remote")"; return 1; }
    wait_ticks "$W/dst.serial" 1 3 "$T_TICKS" || return 1
    source_exits_clean src || return 1
    _dev=$(grep -m1 -oE 'VFIO device state: [0-9]+ bytes during pre-copy, [0-9]+ bytes in the downtime' "$W/src.log")
    note="paused VM migrated (${_dev:-no device byte counts logged}), ticks ok after resume on the destination"
}

# b. Snapshot to disk and restore onto a fresh mdev.
scn_ch_snapshot_restore() {
    mk_mdev && ms=$MDEV && mk_mdev && mr=$MDEV || return 1
    vm_start src "$ms" || return 1
    wait_ticks "$W/src.serial" 1 1 "$T_BOOT" || return 1
    remote src pause || { why="pause failed"; return 1; }
    mkdir -p "$W/snap"
    remote src snapshot "file://$W/snap" || { why="snapshot failed: $(tail -n 1 "$W/src.remote")"; return 1; }
    remote src shutdown-vmm || true
    wait_exit src || return 1
    ls -l "$W/snap" > "$W/snap.ls"
    # Keep a pristine copy for ch-restore-damaged.
    rm -rf "$base/snap-pristine"
    cp -r "$W/snap" "$base/snap-pristine"
    sed -i "s|$(uuid_of "$ms")|$(uuid_of "$mr")|g" "$W/snap/config.json"
    grep -q "$(uuid_of "$mr")" "$W/snap/config.json" || { why="config.json names no device path"; return 1; }
    vmm_start rst --restore "source_url=file://$W/snap" || return 1
    remote rst resume || { why="resume after restore failed"; return 1; }
    # The restored VM continues the source's tick sequence: its first tick must read back ok.
    wait_ticks "$W/rst.serial" 1 3 "$T_TICKS" || return 1
    set -- "$W"/snap/vfio-state-*.bin
    if [ ! -f "$1" ]; then why="no vfio-state-*.bin beside state.json ($(cd "$W/snap" && echo *))"; return 1; fi
    if ! vfio-mig inspect "$1" > "$W/inspect.out" 2>&1; then
        why="vfio-mig inspect ${1##*/} failed: $(tail -n 2 "$W/inspect.out" | tr '\n' ' ')"
        return 1
    fi
    if grep -q 'blob' "$W/snap/state.json"; then why="state.json holds a base64 \"blob\""; return 1; fi
    _leaf=$(tr -d '\n' < "$W/snap/state.json" | grep -o 'vfio-migration-stream/v1[^}]*' | head -n1)
    if [ -z "$_leaf" ]; then why="state.json has no vfio_migration leaf of format vfio-migration-stream/v1"; return 1; fi
    case "$_leaf" in
        *data*) why="the vfio_migration leaf holds inline data: $(echo "$_leaf" | cut -c1-100)"; return 1 ;;
        *file*) ;;
        *) why="the vfio_migration leaf names no file: $_leaf"; return 1 ;;
    esac
    note="$(wc -c < "$1") byte state file ${1##*/}"
}

# c. The snapshot of b with one byte of its state file flipped: the restore is refused.
scn_ch_restore_damaged() {
    if [ ! -d "$base/snap-pristine" ]; then why="no snapshot from ch-snapshot-restore"; return 1; fi
    cp -r "$base/snap-pristine" "$W/snap"
    set -- "$W"/snap/vfio-state-*.bin
    if [ ! -f "$1" ]; then why="the snapshot has no vfio-state-*.bin to damage"; return 1; fi
    _size=$(wc -c < "$1")
    _off=$((_size / 2))
    _b=$(dd if="$1" bs=1 skip="$_off" count=1 2>/dev/null | od -An -tu1)
    _b=$(((_b + 0) ^ 255))
    # shellcheck disable=SC2059 # the format is the octal escape of the byte
    printf "\\$(printf %03o "$_b")" | dd of="$1" bs=1 seek="$_off" count=1 conv=notrunc 2>/dev/null
    say "flipped byte $_off of ${1##*/} ($_size bytes)"
    mk_mdev && mr=$MDEV || return 1
    _old=$(sed -nE 's|.*/sys/bus/mdev/devices/([0-9a-f-]{36}).*|\1|p' "$W/snap/config.json" | head -n1)
    sed -i "s|$_old|$(uuid_of "$mr")|g" "$W/snap/config.json"
    vmm_start rst --restore "source_url=file://$W/snap" || {
        # A VMM that exits before its socket appears refused the restore: that is fine here.
        alive "$(pid_of rst)" && return 1
    }
    if alive "$(pid_of rst)"; then
        if remote rst resume; then
            sleep 5
            if alive "$(pid_of rst)" && [ "$(tick_count "$W/rst.serial")" -gt 0 ]; then
                why="the damaged snapshot was restored and the VM runs"
                return 1
            fi
        fi
    fi
    if ! wait_exit rst; then
        kill -9 "$(pid_of rst)" 2>/dev/null
        why="rst still runs after a refused resume"
        return 1
    fi
    if [ "$EXIT_RC" = 0 ] && ! grep -q ' ERROR:' "$W/rst.log"; then
        why="the restore VMM exited 0 without an error"
        return 1
    fi
    _e=$(grep -m1 -i 'offset' "$W/rst.log" "$W/rst.remote" 2>/dev/null)
    if [ -z "$_e" ]; then why="the refusal names no byte offset"; return 1; fi
    note="refused (exit $EXIT_RC): ${_e#*:}"
}

# d. The destination is killed during the migration: the source VM keeps running.
scn_ch_dest_killed() {
    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    VM_MEM=512M
    vm_start src "$ms" || return 1
    wait_ticks "$W/src.serial" 1 1 "$T_BOOT" || return 1
    recv_start dst "$md" || return 1
    send src dst "" || return 1
    # Protocol version 1: the kill comes after mtty's pre-copy data was loaded on the destination.
    if ! wait_until 60 grep -q 'pre-copy data arriving' "$W/dst.log"; then
        why="no DeviceState message reached the destination: $(grep -m1 'Migration protocol' "$W/dst.log")"
        return 1
    fi
    if mig_done src; then why="the migration finished before the kill (make the guest larger)"; return 1; fi
    kill -9 "$(pid_of dst)"
    say "killed the destination after its DeviceState messages"
    if ! wait_until "$T_MIG" mig_over src; then why="the source did not notice the dead destination"; return 1; fi
    if mig_done src; then why="the source says the migration completed"; return 1; fi
    if ! alive "$(pid_of src)"; then
        why="the source VMM died: $(grep -m1 -E 'ERROR|violation|panicked' "$W/src.log")"
        return 1
    fi
    _n=$(tick_count "$W/src.serial")
    wait_ticks "$W/src.serial" 1 3 "$T_TICKS" "$_n" || return 1
    if ticks "$W/src.serial" | grep -q BAD; then why="a BAD tick on the source"; return 1; fi
    note="killed after DeviceState; source: $(grep -m1 'Migration failed' "$W/src.log" | sed 's/.* -- //')"
}

# e. Two mtty devices, local=on (shared memory).
scn_ch_live_2dev_local() {
    mk_mdev && ms0=$MDEV && mk_mdev && ms1=$MDEV && mk_mdev && md0=$MDEV && mk_mdev && md1=$MDEV || return 1
    VM_MEM=128M,shared=on
    vm_start src "$ms0" "$ms1" || return 1
    wait_ticks "$W/src.serial" 2 1 "$T_BOOT" || return 1
    migrate_verify src dst local=on "$md0" "$md1" || return 1
    source_exits_clean src || return 1
    note="downtime ${MIG_DOWNTIME_MS}ms, total ${MIG_TOTAL_S}s"
}

# f. Hot-unplug vfio1, migrate, hot-plug a fresh vfio1 on the destination.
scn_ch_hotunplug() {
    mk_mdev && ms0=$MDEV && mk_mdev && ms1=$MDEV && mk_mdev && md0=$MDEV && mk_mdev && mn=$MDEV || return 1
    vm_start src "$ms0" "$ms1" || return 1
    wait_ticks "$W/src.serial" 2 1 "$T_BOOT" || return 1
    remote src remove-device vfio1 || { why="remove-device vfio1 failed: $(tail -n1 "$W/src.remote")"; return 1; }
    _n=$(tick_count "$W/src.serial")
    # L2 ejects the device (ACPI hotplug): the ticks go down to one device.
    wait_ticks "$W/src.serial" 1 2 "$T_TICKS" "$_n" || { why="after remove-device: $why"; return 1; }
    migrate_verify src dst "" "$md0" || return 1
    source_exits_clean src || return 1
    remote dst add-device "path=$mn,id=vfio1" || { why="add-device on the destination failed: $(tail -n1 "$W/dst.remote")"; return 1; }
    _n=$(tick_count "$W/dst.serial")
    # vfio0 must keep ticking ok. L2 sees the new function through ACPI hotplug, but it moves the
    # function's I/O BAR (Linux reassigns it) and the new device does not answer there: what the
    # second column says is reported, not judged (a fresh device has no state to keep anyway).
    wait_ticks "$W/dst.serial" 1 4 "$T_TICKS" "$_n" '^L2-TICK [0-9]+ scr=[0-9]+/ok( |$)' \
        '^L2-TICK [0-9]+ scr=[0-9]+/BAD' || return 1
    note="after add-device: $(ticks "$W/dst.serial" | tail -n1)$(tr -d '\r' < "$W/dst.serial" | grep -m1 -E '^L2-(DEV|GONE)' | sed 's/^/, /')"
}

# g. A legacy VFIO group/container source (no --platform iommufd=on). Upstream (seccomp off)
# records its message; ours either migrates or refuses with a message, the source running on.
legacy_try() { # tag
    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    VM_PLATFORM=""
    vm_start "src$1" "$ms" || return 1
    wait_ticks "$W/src$1.serial" 1 1 "$T_BOOT" || return 1
    recv_start "dst$1" "$md" || return 1
    if ! remote "src$1" send-migration "destination_url=unix:$W/mig-dst$1.sock"; then
        if grep -q 'no answer in' "$W/src$1.remote"; then
            why="src$1: send-migration did not return in ${T_REMOTE}s (last L2 tick: $(ticks "$W/src$1.serial" | tail -n 1))"
            return 1
        fi
        LEGACY_OUTCOME="refused by send-migration: $(tail -n 1 "$W/src$1.remote")"
    else
        if ! wait_until "$T_MIG" mig_over "src$1"; then why="src$1: no outcome after ${T_MIG}s"; return 1; fi
        if mig_done "src$1"; then
            wait_ticks "$W/dst$1.serial" 1 3 "$T_TICKS" || return 1
            LEGACY_OUTCOME="migrated"
            return 0
        fi
        _e=$(grep -m1 -E 'Migration failed|ERROR' "$W/src$1.log" | sed 's/.* -- //')
        _r=$(grep -m1 -E ' (ERROR|WARN):.*[Mm]igration' "$W/dst$1.log" | sed 's/.* -- //')
        LEGACY_OUTCOME="refused: ${_e:-no message on the source}${_r:+ | destination: $_r}"
    fi
    if ! alive "$(pid_of "src$1")"; then why="src$1 died after the refusal"; return 1; fi
    _n=$(tick_count "$W/src$1.serial")
    wait_ticks "$W/src$1.serial" 1 3 "$T_TICKS" "$_n" || return 1
}

scn_ch_legacy_container() {
    VM_BIN="$CLOUD_HYPERVISOR_UPSTREAM" VM_REMOTE="$CH_REMOTE_UPSTREAM" SECCOMP_ARGS="--seccomp false"
    LEGACY_OUTCOME=""
    if legacy_try up; then
        echo "CH-LEGACY upstream(seccomp=off): $LEGACY_OUTCOME"
    else
        echo "CH-LEGACY upstream(seccomp=off): harness trouble: $why"
    fi
    why=""
    scn_cleanup
    VM_BIN="$CLOUD_HYPERVISOR" VM_REMOTE="$CH_REMOTE" SECCOMP_ARGS="$ours_seccomp"
    LEGACY_OUTCOME=""
    legacy_try ours || return 1
    echo "CH-LEGACY ours: $LEGACY_OUTCOME"
    # A clear refusal names why: the container/group path, iommufd or the vfio_fds it lacks.
    case "$LEGACY_OUTCOME" in
        migrated) note="ours migrated" ;;
        *[Ii][Oo][Mm][Mm][Uu][Ff][Dd]* | *[Cc]ontainer* | *[Vv][Ff][Ii][Oo]" group"* | *vfio_fds* | *[Ll]egacy*)
            note="ours $LEGACY_OUTCOME" ;;
        *) why="ours refused without naming why (iommufd, container, VFIO group, vfio_fds, legacy): $LEGACY_OUTCOME"; return 1 ;;
    esac
}

# i. Protocol version 1: mtty's pre-copy data (its 24-byte header) moves during the memory
# iterations, the source waits for the destination's switchover acknowledgement, and the device
# data inside the downtime is smaller than in the same migration with vfio_precopy=off.
devstate_run() { # tag platform: sets DS_PRE, DS_DOWN (device data bytes ahead / in the downtime)
    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    VM_PLATFORM=$2
    vm_start "src$1" "$ms" || return 1
    wait_ticks "$W/src$1.serial" 1 1 "$T_BOOT" || return 1
    migrate_verify "src$1" "dst$1" "" "$md" || return 1
    source_exits_clean "src$1" || return 1
    _l=$(grep -m1 'Migration completed after' "$W/src$1.log")
    DS_PRE=$(echo "$_l" | sed -nE 's/.*VFIO device state: ([0-9]+) bytes during pre-copy.*/\1/p')
    DS_DOWN=$(echo "$_l" | sed -nE 's/.*pre-copy, ([0-9]+) bytes in the downtime.*/\1/p')
    if [ -z "$DS_PRE" ] || [ -z "$DS_DOWN" ]; then why="src$1: no VFIO device byte counts in: $_l"; return 1; fi
    say "src$1: device data $DS_PRE bytes during pre-copy, $DS_DOWN in the downtime"
}

scn_ch_devstate() {
    devstate_run on iommufd=on || return 1
    if ! grep -q 'Migration protocol version 1' "$W/srcon.log"; then
        why="srcon: version 1 not negotiated: $(grep -m1 'Migration protocol' "$W/srcon.log")"
        return 1
    fi
    if ! grep -q 'switchover acknowledged by the destination' "$W/srcon.log"; then
        why="srcon: no switchover acknowledgement: $(grep -m1 'VFIO device state' "$W/srcon.log")"
        return 1
    fi
    if ! grep -q 'pre-copy data arriving' "$W/dston.log"; then why="dston: no DeviceState message"; return 1; fi
    if ! grep -q 'VFIO devices prepared for the incoming migration' "$W/dston.log"; then
        why="dston: the devices were not prepared at Config"
        return 1
    fi
    _pre=$DS_PRE _down=$DS_DOWN
    if [ "$_pre" -le 0 ]; then why="no device data went ahead during pre-copy"; return 1; fi
    scn_cleanup
    devstate_run off iommufd=on,vfio_precopy=off || return 1
    if [ "$DS_PRE" != 0 ]; then why="vfio_precopy=off still sent $DS_PRE bytes ahead"; return 1; fi
    if [ "$_down" -ge "$DS_DOWN" ]; then
        why="device data in the downtime with pre-copy ($_down bytes) is not smaller than without ($DS_DOWN)"
        return 1
    fi
    note="device bytes in the downtime: $_down with pre-copy ($_pre went ahead) vs $DS_DOWN without"
}

# j. Mixed versions: upstream (seccomp off) -> ours, and ours -> upstream (seccomp off).
scn_ch_mixed_versions() {
    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    VM_BIN="$CLOUD_HYPERVISOR_UPSTREAM" VM_REMOTE="$CH_REMOTE_UPSTREAM" SECCOMP_ARGS="--seccomp false"
    vm_start srcup "$ms" || return 1
    wait_ticks "$W/srcup.serial" 1 1 "$T_BOOT" || return 1
    VM_BIN="$CLOUD_HYPERVISOR" VM_REMOTE="$CH_REMOTE" SECCOMP_ARGS="$ours_seccomp"
    recv_start dstours "$md" || return 1
    VM_REMOTE="$CH_REMOTE_UPSTREAM"
    send srcup dstours "" || { why="upstream -> ours: $why"; return 1; }
    wait_migration srcup || { why="upstream -> ours: $why"; return 1; }
    wait_ticks "$W/dstours.serial" 1 3 "$T_TICKS" || { why="upstream -> ours: $why"; return 1; }
    if ! grep -q 'Migration protocol version 0' "$W/dstours.log"; then
        why="upstream -> ours: the destination did not fall back to version 0"
        return 1
    fi
    _a="upstream->ours migrated (downtime ${MIG_DOWNTIME_MS}ms)"
    scn_cleanup

    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    VM_BIN="$CLOUD_HYPERVISOR" VM_REMOTE="$CH_REMOTE" SECCOMP_ARGS="$ours_seccomp"
    vm_start srcours "$ms" || return 1
    wait_ticks "$W/srcours.serial" 1 1 "$T_BOOT" || return 1
    VM_BIN="$CLOUD_HYPERVISOR_UPSTREAM" VM_REMOTE="$CH_REMOTE_UPSTREAM" SECCOMP_ARGS="--seccomp false"
    recv_start dstup "$md" || return 1
    VM_REMOTE="$CH_REMOTE"
    send srcours dstup "" || { why="ours -> upstream: $why"; return 1; }
    wait_migration srcours || { why="ours -> upstream: $why"; return 1; }
    wait_ticks "$W/dstup.serial" 1 3 "$T_TICKS" || { why="ours -> upstream: $why"; return 1; }
    if ! grep -q 'the destination is a Cloud Hypervisor without' "$W/srcours.log"; then
        why="ours -> upstream: the source did not notice an unpatched destination"
        return 1
    fi
    source_exits_clean srcours || return 1
    note="$_a; ours->upstream migrated in the in-tree format (downtime ${MIG_DOWNTIME_MS}ms)"
}

# k. vfio-user devices (`--user-device`), each served by `vfio-mig serve` in L1 (emulated state of
# VU_SIZE that the source's device changes while it runs, `dirty-rate`). The destination's device
# is a second server (the "destination host's": same seed, no changes of its own), so it ends
# with the source's content only if the state moved: ours is given it with receive-migration's
# `vfio_user_sockets`; upstream has no such option, so the VM's socket path is a symlink, pointed
# at the second server before migrating. Ours: the device joins the VM's migration group over its
# own vfio-user connection (pre-copy while the VM runs, loaded ahead, stop-copy, checked state)
# and the destination loads exactly what the source saved, while L2 reads back on the destination
# the SCRATCH value it wrote on the source (through the device's I/O BAR2), and the completion line
# counts the pre-copy rounds that carried the device's state; a device whose server cannot migrate
# (`--no-migration`) makes send-migration and snapshot refuse up front. Upstream: migrates, and
# L2's first tick on the destination reads a reset SCRATCH (BAR) and its destination's device
# lacks the source's content. Printed side by side.
VU_SIZE=256M
vu_serve() { # name seed [,more params [serve options]]: one connection, then a JSON report
    rm -f "$W/$1.vu"
    # shellcheck disable=SC2086 # $4 is an option list
    /rig/vfio-mig serve "emulated:size=$VU_SIZE,seed=$2,flags=stop-copy+pre-copy${3:-}" \
        --socket "$W/$1.vu" --connections 1 --json ${4:-} > "$W/$1.serve" 2> "$W/$1.serve.log" &
    eval "PID_$1=$!"
    PIDS="$PIDS $!"
    if ! wait_until "$T_SOCK" test -S "$W/$1.vu"; then
        why="$1: vfio-mig serve did not listen: $(tail -n 2 "$W/$1.serve.log" | tr '\n' ' ')"
        return 1
    fi
}
vu_field() { sed -nE "s/.*\"$2\":\"([^\"]+)\".*/\1/p" "$W/$1.serve" | tail -n 1; }
# vu_report NAME: waits for the server to exit after its connection; sets VU_STATE, VU_DIGEST (the
# content at the end), VU_SAVED (when the device last entered STOP_COPY), VU_LOADED (when a load
# into it last completed): a source's device runs on when its VMM exits, so its content at the
# end is not what it sent.
vu_report() {
    _p=$(pid_of "$1")
    if ! wait_until "$T_EXIT" eval "! alive $_p"; then
        why="$1: vfio-mig serve still running ${T_EXIT}s after its client left"
        return 1
    fi
    VU_STATE=$(vu_field "$1" state) VU_DIGEST=$(vu_field "$1" digest)
    VU_SAVED=$(vu_field "$1" saved_digest) VU_LOADED=$(vu_field "$1" loaded_digest)
    if [ -z "$VU_DIGEST" ]; then why="$1: no report: $(tail -n 2 "$W/$1.serve.log" | tr '\n' ' ')"; return 1; fi
}
# vu_migrate TAG symlink|option kept|lost: a VM (TAG) with one vfio-user device migrates to TAGdst
# (VM_BIN etc. as set), the destination's server given by re-pointing the symlink or by the
# option; L2 on the destination must then read back the SCRATCH value it wrote on the source
# (kept) or something else (lost); sets VU_L2 (the destination's first tick), VU_SRC (the source's content when its state was saved, else at the end), VU_DST (the
# destination's content at the end), VU_DST_LOADED (what a load brought, if any), VU_DST_STATE.
vu_migrate() {
    vu_serve "${1}vs" 7 ,dirty-rate=1M && vu_serve "${1}vd" 7 || return 1
    ln -sf "${1}vs.vu" "$W/vu.sock"
    vm_start "$1" || return 1
    wait_ticks "$W/$1.serial" 1 2 "$T_BOOT" || return 1
    if [ "$2" = symlink ]; then
        ln -sf "${1}vd.vu" "$W/vu.sock"
        recv_start "${1}dst" || return 1
    else
        RECV_EXTRA=",vfio_user_sockets=[vu0@$W/${1}vd.vu]"
        recv_start "${1}dst" || { RECV_EXTRA=""; return 1; }
        RECV_EXTRA=""
    fi
    send "$1" "${1}dst" "" || return 1
    wait_migration "$1" || return 1
    if [ "$3" = lost ]; then
        # The first tick on the destination reads SCRATCH back from a device that is not the one
        # it wrote: BAD.
        wait_ticks "$W/${1}dst.serial" 1 1 "$T_TICKS" 0 'scr=[0-9]+/BAD' '^$' || { why="destination: $why"; return 1; }
    else
        wait_ticks "$W/${1}dst.serial" 1 2 "$T_TICKS" || { why="destination: $why"; return 1; }
    fi
    VU_L2=$(ticks "$W/${1}dst.serial" | head -n 1)
    wait_exit "$1" || return 1
    vu_report "${1}vs" || return 1
    VU_SRC=${VU_SAVED:-$VU_DIGEST}
    remote "${1}dst" shutdown-vmm || { why="${1}dst: shutdown-vmm failed"; return 1; }
    wait_exit "${1}dst" || return 1
    vu_report "${1}vd" || return 1
    VU_DST=$VU_DIGEST VU_DST_STATE=$VU_STATE VU_DST_LOADED=$VU_LOADED
}
scn_ch_vfio_user() {
    VM_MEM=128M,shared=on
    VM_PLATFORM=""
    VM_EXTRA="--user-device socket=$W/vu.sock,id=vu0"

    # Ours: the device's state moves.
    vu_migrate ours option kept || { why="ours: $why"; return 1; }
    if ! grep -q "vfio-user device vu0: the destination's server is $W/oursvd.vu" "$W/oursdst.log"; then
        why="ours: the destination did not take the server given in vfio_user_sockets"
        return 1
    fi
    # The destination's content at the end differs from what it loaded: L2 writes SCRATCH (device
    # state) every tick once it runs there.
    if [ "$VU_DST_LOADED" != "$VU_SRC" ] || [ "$VU_DST_STATE" != RUNNING ]; then
        why="ours: the destination's device ended $VU_DST_STATE having loaded ${VU_DST_LOADED:-nothing}, the source saved $VU_SRC"
        return 1
    fi
    _dev=$(grep -m1 -oE 'VFIO device state: [0-9]+ bytes during pre-copy, [0-9]+ bytes in the downtime; [0-9]+ pre-copy rounds carried device state \([0-9]+ memory iterations\)' "$W/ours.log")
    _rounds=$(echo "$_dev" | sed -nE 's/.*; ([0-9]+) pre-copy rounds.*/\1/p')
    if [ "${_rounds:-0}" -lt 1 ]; then
        why="ours: no pre-copy round carried the device's state: ${_dev:-no completion line with device byte counts}"
        return 1
    fi
    _ours="ours migrated (downtime ${MIG_DOWNTIME_MS}ms; $_dev), L2 on the destination read SCRATCH back ($VU_L2), the destination loaded content $VU_DST_LOADED = the source's saved"

    # Ours, a server without migration: refused up front, the VM and its device run on.
    vu_serve nomig 7 ,dirty-rate=1M --no-migration || return 1
    ln -sf nomig.vu "$W/vu.sock"
    vm_start refuse || return 1
    wait_ticks "$W/refuse.serial" 1 2 "$T_BOOT" || return 1
    if remote refuse send-migration "destination_url=unix:$W/mig-nobody.sock"; then
        why="ours: send-migration of a VM with a vfio-user device that cannot migrate was accepted"
        return 1
    fi
    if ! grep -q "Refusing to migrate: the VM has vfio-user device(s) vu0 (vfio-user:$W/vu.sock) whose server offers no migration" "$W/refuse.remote"; then
        why="ours: send-migration failed without naming vu0: $(tail -n 3 "$W/refuse.remote" | tr '\n' ' ')"
        return 1
    fi
    if remote refuse snapshot "file://$W"; then
        why="ours: snapshot of a VM with a vfio-user device that cannot migrate was accepted"
        return 1
    fi
    if ! grep -q "Refusing to snapshot: the VM has vfio-user device(s) vu0" "$W/refuse.remote"; then
        why="ours: snapshot failed without naming vu0: $(tail -n 3 "$W/refuse.remote" | tr '\n' ' ')"
        return 1
    fi
    _n=$(tick_count "$W/refuse.serial")
    wait_ticks "$W/refuse.serial" 1 2 "$T_TICKS" "$_n" || { why="ours after the refusals: $why"; return 1; }
    remote refuse shutdown-vmm || { why="refuse: shutdown-vmm failed"; return 1; }
    wait_exit refuse || return 1
    vu_report nomig || return 1
    if [ "$VU_STATE" != RUNNING ]; then why="ours: the device without migration ended $VU_STATE, not RUNNING"; return 1; fi
    _refused="a device without migration: send-migration and snapshot refused, the VM ran on"

    # Upstream: migrates, and the destination's device is not the source's.
    VM_BIN="$CLOUD_HYPERVISOR_UPSTREAM" VM_REMOTE="$CH_REMOTE_UPSTREAM" SECCOMP_ARGS="--seccomp false"
    vu_migrate up symlink lost || { why="upstream: $why"; return 1; }
    if [ -n "$VU_DST_LOADED" ]; then
        why="upstream: the destination's device loaded state ($VU_DST_LOADED): the scenario shows no loss"
        return 1
    fi
    _up="upstream migrated (downtime ${MIG_DOWNTIME_MS}ms), L2 on the destination read a reset SCRATCH ($VU_L2), the destination's device loaded nothing (content $VU_DST, the source's $VU_SRC): state lost, nothing said"
    say "vfio-user side by side: $_ours | $_up | $_refused"
    note="$_ours; $_up; $_refused"
}

# k2. Snapshot and restore of a VM with a vfio-user device: the paused VM's snapshot keeps the
# device's state in a file beside state.json; the VM is restored onto a second server of the same
# device (the socket path re-pointed), which loads exactly what the first one saved, and L2 reads
# back after resume the SCRATCH value it wrote before the snapshot.
scn_ch_vfio_user_snapshot() {
    VM_MEM=128M,shared=on
    VM_PLATFORM=""
    VM_EXTRA="--user-device socket=$W/vu.sock,id=vu0"
    _size=$VU_SIZE
    VU_SIZE=32M
    _ok=1
    if vu_serve snapvs 7 ,dirty-rate=1M && vu_serve snapvd 7; then _ok=0; fi
    VU_SIZE=$_size
    [ "$_ok" = 0 ] || return 1
    ln -sf snapvs.vu "$W/vu.sock"
    vm_start src || return 1
    wait_ticks "$W/src.serial" 1 2 "$T_BOOT" || return 1
    remote src pause || { why="pause failed: $(tail -n 1 "$W/src.remote")"; return 1; }
    mkdir -p "$W/snap"
    remote src snapshot "file://$W/snap" || { why="snapshot failed: $(tail -n 2 "$W/src.remote" | tr '\n' ' ')"; return 1; }
    remote src shutdown-vmm || true
    wait_exit src || return 1
    vu_report snapvs || return 1
    _saved=$VU_SAVED
    set -- "$W"/snap/vfio-state-*.bin
    if [ ! -f "$1" ]; then why="no vfio-state-*.bin beside state.json ($(cd "$W/snap" && echo *))"; return 1; fi
    _file="${1##*/} ($(wc -c < "$1") bytes)"
    ln -sf snapvd.vu "$W/vu.sock"
    vmm_start rst --restore "source_url=file://$W/snap" || return 1
    remote rst resume || { why="resume after restore failed: $(tail -n 1 "$W/rst.remote")"; return 1; }
    wait_ticks "$W/rst.serial" 1 3 "$T_TICKS" || return 1
    remote rst shutdown-vmm || { why="rst: shutdown-vmm failed"; return 1; }
    wait_exit rst || return 1
    vu_report snapvd || return 1
    if [ -z "$_saved" ] || [ "$VU_LOADED" != "$_saved" ]; then
        why="the restored device loaded ${VU_LOADED:-nothing}, the snapshot saved ${_saved:-nothing}"
        return 1
    fi
    note="state file $_file; the restored device loaded content $VU_LOADED = saved; L2 read SCRATCH back ($(ticks "$W/rst.serial" | head -n 1))"
}

# h. The same single-device pre-copy migration 5 times each with upstream (seccomp off), ours
# (seccomp as configured, on by default) and ours with seccomp off, interleaved.
compare_one() { # tag
    mk_mdev && ms=$MDEV && mk_mdev && md=$MDEV || return 1
    vm_start "src$1" "$ms" || return 1
    wait_ticks "$W/src$1.serial" 1 1 "$T_BOOT" || return 1
    migrate_verify "src$1" "dst$1" "" "$md" || return 1
    source_exits_clean "src$1" || return 1
    echo "$MIG_DOWNTIME_MS $MIG_TOTAL_S" >> "$W/$2.results"
}

median() { # column file
    _c=$(wc -l < "$2")
    cut -d' ' -f"$1" "$2" | sort -n | sed -n "$(((_c + 1) / 2))p"
}

scn_ch_compare() {
    _runs=${COMPARE_RUNS:-5}
    : > "$W/upstream.results"
    : > "$W/ours.results"
    : > "$W/oursoff.results"
    # Interleaved so that a slow phase of the emulator hits all three, and the order rotated every
    # run (upstream first, then ours first, then ours without seccomp first, ...) so that no side
    # always follows the same one. Ours without seccomp is the like-for-like comparison with
    # upstream (which must run without it); the difference to ours with seccomp is the filters' cost.
    run=1
    while [ "$run" -le "$_runs" ]; do
        case $((run % 3)) in
            1) _order="upstream ours oursoff" ;;
            2) _order="ours oursoff upstream" ;;
            *) _order="oursoff upstream ours" ;;
        esac
        for _side in $_order; do
            if [ "$_side" = upstream ]; then
                VM_BIN="$CLOUD_HYPERVISOR_UPSTREAM" VM_REMOTE="$CH_REMOTE_UPSTREAM" SECCOMP_ARGS="--seccomp false"
            elif [ "$_side" = oursoff ]; then
                VM_BIN="$CLOUD_HYPERVISOR" VM_REMOTE="$CH_REMOTE" SECCOMP_ARGS="--seccomp false"
            else
                VM_BIN="$CLOUD_HYPERVISOR" VM_REMOTE="$CH_REMOTE" SECCOMP_ARGS="$ours_seccomp"
            fi
            compare_one "$_side$run" "$_side" || { why="$_side run $run: $why"; return 1; }
            check_logs || { why="$_side run $run: $why"; return 1; }
            scn_cleanup
        done
        run=$((run + 1))
    done
    _ud=$(median 1 "$W/upstream.results") _ut=$(median 2 "$W/upstream.results")
    _od=$(median 1 "$W/ours.results") _ot=$(median 2 "$W/ours.results")
    _xd=$(median 1 "$W/oursoff.results") _xt=$(median 2 "$W/oursoff.results")
    echo "CH-COMPARE-SAMPLES downtime_ms upstream: $(cut -d' ' -f1 "$W/upstream.results" | tr '\n' ' ')| ours: $(cut -d' ' -f1 "$W/ours.results" | tr '\n' ' ')| ours(seccomp=off): $(cut -d' ' -f1 "$W/oursoff.results" | tr '\n' ' ')"
    _os=on
    [ -z "$ours_seccomp" ] || _os=off
    echo "CH-COMPARE upstream(seccomp=off): downtime_ms=$_ud total_s=$_ut n=$_runs | ours(seccomp=$_os): downtime_ms=$_od total_s=$_ot n=$_runs | ours(seccomp=off): downtime_ms=$_xd total_s=$_xt n=$_runs"
    # Tolerance: ours <= upstream * 1.25 + 20 ms (timer noise under TCG).
    if [ $((_od * 4)) -gt $((_ud * 5 + 80)) ]; then
        why="ours' median downtime ${_od}ms > upstream's ${_ud}ms * 1.25 + 20ms"
        return 1
    fi
    note="downtime ms ours $_od (without seccomp $_xd) vs upstream $_ud"
}

# =================================================================================================
n=0
for s in $selected; do n=$((n + 1)); done
echo "RIG-PLAN $n"
say "binaries: ours=$CLOUD_HYPERVISOR upstream=$CLOUD_HYPERVISOR_UPSTREAM seccomp(ours)=${CH_SECCOMP:-true}"
run_scn() { # name
    case "$1" in
        ch-live-1dev) scn_ch_live_1dev ;;
        ch-snapshot-restore) scn_ch_snapshot_restore ;;
        ch-restore-damaged) scn_ch_restore_damaged ;;
        ch-dest-killed) scn_ch_dest_killed ;;
        ch-live-2dev-local) scn_ch_live_2dev_local ;;
        ch-hotunplug) scn_ch_hotunplug ;;
        ch-legacy-container) scn_ch_legacy_container ;;
        ch-devstate) scn_ch_devstate ;;
        ch-mixed-versions) scn_ch_mixed_versions ;;
        ch-paused) scn_ch_paused ;;
        ch-vfio-user) scn_ch_vfio_user ;;
        ch-vfio-user-snapshot) scn_ch_vfio_user_snapshot ;;
        ch-compare) scn_ch_compare ;;
    esac
}

# The emulator's known fault: a destination's KVM refuses the source VM's TSC rate
# (KVM_SET_TSC_KHZ EINVAL when restoring the vCPU: nested SVM under TCG has no TSC scaling). Ours
# logs the cause; upstream's only "command State failed: Failed to receive migratable component
# snapshot" right after creating its vCPU.
tsc_fault() {
    grep -qs 'SetTscKhz' "$W"/*.log && return 0
    for _f in "$W"/*.log; do
        [ -f "$_f" ] || continue
        if grep -q 'command State failed: Failed to receive migratable component snapshot$' "$_f" \
            && grep -B1 'command State failed' "$_f" | grep -qE 'Creating vCPU|create new vCPUs'; then
            return 0
        fi
    done
    return 1
}

failed=0
for s in $selected; do
    case " $ALL " in
        *" $s "*) ;;
        *) echo "RIG $s FAIL: unknown nested scenario"; failed=$((failed + 1)); continue ;;
    esac
    attempt=1
    while :; do
        scn_begin "$s"
        t0=$(now)
        say "---- $s"
        ok=1
        run_scn "$s" || ok=0
        first_why="$why"
        if ! check_logs; then
            ok=0
            [ -z "$first_why" ] || why="$first_why; $why"
        fi
        if [ "$ok" = 0 ] && [ "$attempt" = 1 ] && tsc_fault; then
            # Said loudly, never silently: one more attempt, fresh VMs and mdevs.
            echo "RIG-NOTE $s: a destination's KVM refused the source's TSC rate (KVM_SET_TSC_KHZ EINVAL, the emulator's nested SVM has no TSC scaling); running the scenario once more"
            dmesg | grep -iE 'tsc|clocksource' | tail -n 5 | sed 's/^/  dmesg: /'
            scn_cleanup
            attempt=2
            continue
        fi
        break
    done
    if [ "$ok" = 1 ]; then
        again=""
        [ "$attempt" = 1 ] || again=" (second attempt, after the emulator's TSC fault)"
        echo "RIG $s PASS${note:+ ($note)}$again [$(($(now) - t0))s]"
        if [ "${NESTED_VERBOSE:-0}" = 1 ]; then tail_logs; fi
    else
        echo "RIG $s FAIL: ${why:-no reason recorded} [$(($(now) - t0))s]"
        tail_logs
        failed=$((failed + 1))
    fi
    scn_cleanup
done
exit "$failed"
