#!/usr/bin/env bash
# The live-clone story on a real kernel, in the test VM (`make demo-vm`),
# told by the real driver: `liveclone standalone` serves CSI on a socket, and
# the `csi` example (crates/liveclone/examples/csi.rs) makes the calls a
# container orchestrator would make.
#
# A 1 GiB ext4 volume holding 200 MiB of files is cloned; the clone is
# mounted and read at once while the kernel copies the data in the
# background; the driver switches it to a plain linear mapping when done; the
# source is deleted and the clone keeps everything. Then a snapshot of the
# clone is restored into a third volume. SHA-256 sums are checked throughout.
#
# Needs `cargo build -p liveclone --bin liveclone --example csi` (the
# Makefile's demo-vm target does it).
set -euo pipefail

[ "${LIVECLONE_IN_VM:-}" = 1 ] || { echo "run me with: make demo-vm" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MIB=$((1024 * 1024))
FILES=20           # of 10 MiB each
HYDRATE_LIMIT=180  # seconds
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lcdemo.XXXXXX")"
MNT="$WORK/mnt"    # the only folder the driver may mount in (--allowed-mount-root)
POOL="$WORK/pool"
LOG="$WORK/driver.log"
export CSI_ENDPOINT="unix://$WORK/csi.sock" # read by liveclone and csi alike
mkdir -p "$MNT" "$POOL" "$WORK/state" "$WORK/bin"

# Private copies: a rebuild on the host must not swap them mid-demo.
for bin in target/debug/liveclone target/debug/examples/csi; do
    [ -x "$ROOT/$bin" ] || { echo "missing $bin: cargo build -p liveclone --bin liveclone --example csi" >&2; exit 2; }
    cp "$ROOT/$bin" "$WORK/bin/"
done
LIVECLONE="$WORK/bin/liveclone"
CSI="$WORK/bin/csi"

T0=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
step() { printf '\n==> [%5ss] %s\n' "$(since "$T0")" "$*"; }
say() { printf '    %s\n' "$*"; }
indent() { sed 's/^/      /'; }
csi() { "$CSI" "$@"; }
status() { "$LIVECLONE" status; }
status_row() { status | grep "^$1 " || true; }
dm_table() { dmsetup table "liveclone-$1"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# What is published and what exists, so that the exit trap can undo it
# whichever step failed.
PUBLISHED=() # "id staging target"
VOLUMES=()
SNAPSHOTS=()
DRIVER_PID=
FINISHED=0

stop_driver() {
    [ -n "$DRIVER_PID" ] || return 0
    kill -TERM "$DRIVER_PID" 2>/dev/null || true
    for _ in $(seq 1 200); do
        kill -0 "$DRIVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$DRIVER_PID" 2>/dev/null; then
        echo "the driver did not stop within 20 s of SIGTERM; killing it" >&2
        kill -KILL "$DRIVER_PID" 2>/dev/null || true
    fi
    wait "$DRIVER_PID" 2>/dev/null || true
    DRIVER_PID=
}

cleanup() {
    local rc=$? entry id staging target
    set +e
    if [ "$FINISHED" != 1 ]; then
        echo
        echo "==> the demo failed (exit $rc); the driver's log, last lines ($LOG):"
        tail -n 80 "$LOG" 2>/dev/null | sed 's/^/    /'
        echo "==> device-mapper devices:"
        dmsetup ls 2>&1 | sed 's/^/    /'
        for entry in "${PUBLISHED[@]}"; do
            read -r id staging target <<< "$entry"
            "$CSI" unpublish "$id" "$target"
            "$CSI" unstage "$id" "$staging"
        done
        for id in "${VOLUMES[@]}"; do "$CSI" delete-volume "$id"; done
        for id in "${SNAPSHOTS[@]}"; do "$CSI" delete-snapshot "$id"; done
    fi
    stop_driver
    # Whatever is still mounted under the work folder (only after a failure).
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

forget() { # array-name value: removes value from the array
    local -n list=$1
    local kept=() item
    for item in "${list[@]}"; do [ "$item" = "$2" ] || kept+=("$item"); done
    list=("${kept[@]}")
}

mount_volume() { # id tag: staged at $MNT/tag-staging, published at $MNT/tag
    local id=$1 staging="$MNT/$2-staging" target="$MNT/$2"
    mkdir -p "$staging" # the CO makes the staging folder, the driver the target
    csi stage "$id" "$staging" --fs ext4
    PUBLISHED+=("$id $staging $target")
    csi publish "$id" "$staging" "$target"
}

unmount_volume() { # id tag
    local id=$1 staging="$MNT/$2-staging" target="$MNT/$2"
    csi unpublish "$id" "$target"
    csi unstage "$id" "$staging"
    forget PUBLISHED "$id $staging $target"
    rmdir "$staging"
}

delete_volume() {
    csi delete-volume "$1"
    forget VOLUMES "$1"
}

check_files() { # folder what
    (cd "$1" && sha256sum --quiet -c "$WORK/SHA256SUMS")
    say "all $FILES files match their SHA-256 sums ($2)"
}

check_new_file() { # folder
    (cd "$1" && sha256sum --quiet -c "$WORK/NEWFILE.SUM")
    say "and so does the file written to the clone while it hydrated"
}

phase_of() { # id: the PHASE column of `liveclone status`
    local row phase
    row=$(status_row "$1")
    for phase in Pending Hydrating Switching Complete Stalled Failed; do
        [[ "$row" == *" $phase"* ]] && { echo "$phase"; return; }
    done
    echo "-"
}

watch_rows() { # id seconds|complete: one `liveclone status` row per second
    local id=$1 until=$2 start=$EPOCHREALTIME phase
    while :; do
        status_row "$id" | indent
        phase=$(phase_of "$id")
        case $phase in
            Complete) return 0 ;;
            Failed) echo "the hydration of $id failed" >&2; exit 1 ;;
        esac
        if [ "$until" = complete ]; then
            if awk -v a="$start" -v b="$EPOCHREALTIME" -v l="$HYDRATE_LIMIT" 'BEGIN { exit !(b - a > l) }'; then
                echo "the hydration of $id is not complete after ${HYDRATE_LIMIT}s" >&2
                exit 1
            fi
        elif awk -v a="$start" -v b="$EPOCHREALTIME" -v l="$until" 'BEGIN { exit !(b - a >= l) }'; then
            return 0
        fi
        sleep 1
    done
}

step "start the driver: liveclone standalone, pool and state under \$TMPDIR"
RUST_LOG=info NO_COLOR=1 "$LIVECLONE" standalone \
    --state-dir "$WORK/state" --pool-dir "$POOL" --node-id demo \
    --allowed-mount-root "$MNT" --hydration-poll-seconds 0.5 \
    > "$LOG" 2>&1 &
DRIVER_PID=$!
for _ in $(seq 1 300); do
    grep -q "state recovered" "$LOG" && break
    kill -0 "$DRIVER_PID" 2>/dev/null || { echo "the driver exited" >&2; exit 1; }
    sleep 0.2
done
grep -q "state recovered" "$LOG" || { echo "the driver was not ready within 60 s" >&2; exit 1; }
say "serving $CSI_ENDPOINT (pid $DRIVER_PID, log in $LOG)"

step "a 1 GiB ext4 volume: CreateVolume, NodeStageVolume, NodePublishVolume; write $FILES x 10 MiB"
SRC=$(csi create-volume demo-source --size 1GiB --fs ext4); VOLUMES+=("$SRC")
mount_volume "$SRC" source
say "volume $SRC is mounted at $MNT/source"
for i in $(seq 1 "$FILES"); do
    head -c $((10 * MIB)) /dev/urandom > "$MNT/source/file-$i.bin"
done
(cd "$MNT/source" && sha256sum file-*.bin > "$WORK/SHA256SUMS")
sync # so that the clone's timing below is not the write-back of these files
say "$(du -sh "$MNT/source" | cut -f1) of files written and their sums kept; the source stays mounted"

step "clone it: CreateVolume from the volume, then stage and publish the clone at once"
say "(liveclone.io/hydrationThreshold=1 and hydrationBatchSize=1: one 64 KiB region"
say " at a time, the kernel's pace, slow enough to watch; tuned up below)"
start=$EPOCHREALTIME
CLONE=$(csi create-volume demo-clone --size 1GiB --from-volume "$SRC" \
    --param liveclone.io/hydrationThreshold=1 --param liveclone.io/hydrationBatchSize=1)
VOLUMES+=("$CLONE")
CREATE_SECONDS=$(since "$start")
# Paused at once, so that each step below is seen while the copy is still
# to do however fast this machine is; a clone is never paused by itself.
"$LIVECLONE" hydration pause "$CLONE" > /dev/null
mount_volume "$CLONE" clone
CLONE_SECONDS=$(since "$start")
say "clone $CLONE: created in ${CREATE_SECONDS}s, mounted at $MNT/clone ${CLONE_SECONDS}s after the request"
say "(paused right after CreateVolume for this demo: \$ liveclone hydration pause $CLONE)"
say "(no data was copied: that time is the driver's dmsetup, loop device and mount steps, slow on"
say " this emulated CPU, and it does not grow with the data the volume holds)"
status | indent
say "its device: dm-clone over (metadata, destination, source image), with a linear tail if larger"
dm_table "$CLONE" | indent

step "use the clone at once, while it hydrates"
check_files "$MNT/clone" "read through the clone, which was $(phase_of "$CLONE")"
echo "written to the clone while it hydrated" > "$MNT/clone/written-during-hydration.txt"
(cd "$MNT/clone" && sha256sum written-during-hydration.txt > "$WORK/NEWFILE.SUM")
say "wrote written-during-hydration.txt to the clone"
status_row "$CLONE" | indent

step "watch the hydration (liveclone status, every second)"
status | sed -n 1p | indent
say "paused: the copy waits, reads of what is not copied yet go to the source"
watch_rows "$CLONE" 2
say "\$ liveclone hydration resume $CLONE"
"$LIVECLONE" hydration resume "$CLONE" > /dev/null
watch_rows "$CLONE" 3
start=$EPOCHREALTIME
if [ "$(phase_of "$CLONE")" = Complete ]; then
    say "(already complete: this machine copied it before the tune below was needed)"
else
    say "\$ liveclone hydration tune $CLONE --threshold 64 --batch-size 64"
    if ! refusal=$("$LIVECLONE" hydration tune "$CLONE" --threshold 64 --batch-size 64 2>&1 > /dev/null); then
        # Refused only when the copy completed in between; any other
        # refusal is a failure.
        [ "$(phase_of "$CLONE")" = Complete ] || { echo "tune was refused: $refusal" >&2; exit 1; }
        say "(the copy completed just before the tune: $refusal)"
    fi
fi
watch_rows "$CLONE" complete
say "complete $(since "$start")s later; the driver switched the device to linear under the mount:"
dm_table "$CLONE" | indent
[ "$(dm_table "$CLONE" | wc -l)" = 1 ] && dm_table "$CLONE" | grep -q " linear " \
    || { echo "the clone's table is not a single linear line" >&2; exit 1; }

step "delete the source volume: the clone is an independent copy"
unmount_volume "$SRC" source
delete_volume "$SRC"
say "source $SRC unpublished, unstaged and deleted"
drop_caches
check_files "$MNT/clone" "the clone, source gone, page cache dropped"
check_new_file "$MNT/clone"

step "snapshot the clone (CreateSnapshot) and restore it into a new volume"
SNAP=$(csi create-snapshot demo-snapshot --source "$CLONE"); SNAPSHOTS+=("$SNAP")
say "snapshot $SNAP (an ext4 pool has no reflink: the cut renames the clone's data file into"
say "the snapshot's image, and the clone copies itself back from it in the background)"
start=$EPOCHREALTIME
RESTORED=$(csi create-volume demo-restored --size 1GiB --from-snapshot "$SNAP"); VOLUMES+=("$RESTORED")
mount_volume "$RESTORED" restored
say "restored into $RESTORED, mounted $(since "$start")s after the request"
status | indent
check_files "$MNT/restored" "the restored volume, which was $(phase_of "$RESTORED")"
check_new_file "$MNT/restored"

step "clean up: unpublish, unstage, delete (hydrating or not), stop the driver"
unmount_volume "$RESTORED" restored
unmount_volume "$CLONE" clone
delete_volume "$RESTORED"
csi delete-snapshot "$SNAP"; forget SNAPSHOTS "$SNAP"
delete_volume "$CLONE"
status | indent
leftovers() {
    local dm loops files
    dm=$(dmsetup ls | grep -c '^liveclone-' || true)
    loops=$(losetup -l -n -O BACK-FILE | grep -c "^$POOL/" || true)
    files=$(find "$POOL" -type f | wc -l)
    echo "$dm device-mapper devices, $loops loop devices, $files pool files"
}
for _ in $(seq 1 20); do # images are released by the monitor's next round
    [ "$(leftovers)" = "0 device-mapper devices, 0 loop devices, 0 pool files" ] && break
    sleep 0.5
done
say "left: $(leftovers)"
[ "$(leftovers)" = "0 device-mapper devices, 0 loop devices, 0 pool files" ] \
    || { echo "something was left behind" >&2; exit 1; }
stop_driver
say "driver stopped"

FINISHED=1
echo
echo "demo passed in $(since "$T0")s: a clone of a 1 GiB ext4 volume was mounted ${CLONE_SECONDS}s after CreateVolume," \
    "read right while hydrating, switched to linear, outlived its source and was restored from a snapshot;" \
    "every checksum matched and nothing was left behind"
