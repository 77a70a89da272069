#!/usr/bin/env bash
# The live-clone story on a real kernel, in the test VM (`make demo-vm`):
# a volume holding a file system is cloned, the clone is mounted and used at
# once, the kernel copies the data in the background while progress is shown,
# and at the end the clone is switched to a plain linear mapping and no
# longer needs its source.
#
# Until the driver lands this drives device-mapper with dmsetup directly; the
# driver performs the same steps (see docs/ARCHITECTURE.md).
set -euo pipefail

[ "${LIVECLONE_IN_VM:-}" = 1 ] || { echo "run me with: make demo-vm" >&2; exit 2; }

MIB=$((1024 * 1024))
SIZE=$((512 * MIB))
SECTORS=$((SIZE / 512))
REGION=8 # sectors: 4 KiB regions
WORK="$(mktemp -d)"
PREFIX=lcdemo

cleanup() {
    set +e
    umount "$WORK/mnt" 2>/dev/null
    for dev in $PREFIX-clone $PREFIX-source; do dmsetup remove --retry "$dev" 2>/dev/null; done
    for lo in "${LOOPS[@]:-}"; do [ -n "$lo" ] && losetup -d "$lo"; done
    rm -rf "$WORK"
}
LOOPS=()
trap cleanup EXIT

step() { printf '\n==> %s\n' "$*"; }

attach() { # file size -> loop device
    truncate -s "$2" "$1"
    losetup --find --show --direct-io=on "$1"
}

step "a 512 MiB source volume with an ext4 file system and 200 MiB of files"
SRC=$(attach "$WORK/source.img" $SIZE); LOOPS+=("$SRC")
mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$SRC"
mkdir -p "$WORK/mnt"
mount "$SRC" "$WORK/mnt"
for i in $(seq 1 20); do
    head -c $((10 * MIB)) /dev/urandom > "$WORK/mnt/file-$i.bin"
done
(cd "$WORK/mnt" && sha256sum file-*.bin > "$WORK/SHA256SUMS")
umount "$WORK/mnt"
df_line() { df -h --output=size,used,pcent "$1" | tail -1; }

step "clone it: destination and metadata are new, empty volumes"
DST=$(attach "$WORK/dest.img" $SIZE); LOOPS+=("$DST")
META=$(attach "$WORK/meta.img" $((4 * MIB))); LOOPS+=("$META")
# Hydration stays off until the free space has been discarded.
dmsetup create $PREFIX-clone --table \
    "0 $SECTORS clone $META $DST $SRC $REGION 1 no_hydration"
CLONE=/dev/mapper/$PREFIX-clone

step "mount the clone at once (nothing copied yet) and check the files"
mount "$CLONE" "$WORK/mnt"
(cd "$WORK/mnt" && sha256sum --quiet -c "$WORK/SHA256SUMS") && echo "all 20 files read correctly through the clone"
echo "new file written to the clone" > "$WORK/mnt/written-during-hydration.txt"

step "fstrim: free space is marked hydrated without copying"
fstrim -v "$WORK/mnt"

status() { dmsetup status --noflush $PREFIX-clone; }
progress() {
    # <start> <len> clone <meta blk> <used/total> <region> <hydrated/total> <hydrating> ...
    local f; read -ra f <<< "$(status)"
    local done=${f[6]%/*} total=${f[6]#*/}
    printf '%s/%s regions (%3d%%), %s in flight\n' "$done" "$total" $((100 * done / total)) "${f[7]}"
}
progress

step "background hydration while the clone stays mounted"
dmsetup message $PREFIX-clone 0 hydration_threshold 64
dmsetup message $PREFIX-clone 0 hydration_batch_size 256
dmsetup message $PREFIX-clone 0 enable_hydration
while :; do
    progress
    read -ra f <<< "$(status)"
    [ "${f[6]%/*}" = "${f[6]#*/}" ] && [ "${f[7]}" = 0 ] && break
    sleep 1
done

step "switch to linear: flush, suspend, load a linear table, resume (still mounted)"
sync
[ "$(status | awk '{print $NF}')" = rw ] || { echo "metadata not rw"; exit 1; }
dmsetup suspend $PREFIX-clone
dmsetup load $PREFIX-clone --table "0 $SECTORS linear $DST 0"
dmsetup resume $PREFIX-clone
dmsetup table $PREFIX-clone

step "release the source: the clone is an independent copy"
losetup -d "$SRC"; LOOPS=("${LOOPS[@]/$SRC}")
rm -f "$WORK/source.img"
(cd "$WORK/mnt" && sha256sum --quiet -c "$WORK/SHA256SUMS") && echo "all 20 files still correct, source gone"
cat "$WORK/mnt/written-during-hydration.txt"
echo "destination usage: $(du -h --apparent-size "$WORK/dest.img" | cut -f1) apparent, $(du -h "$WORK/dest.img" | cut -f1) allocated (free space was not copied)"
umount "$WORK/mnt"
echo
echo "demo complete"
