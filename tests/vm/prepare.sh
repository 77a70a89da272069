#!/usr/bin/env bash
# Prepares everything the real-kernel test VM needs and caches it by kernel
# version, so that a second run only checks a stamp file.
#
#   tests/vm/prepare.sh            # resolve the current Debian kernel, prepare it
#   LIVECLONE_VM_KERNEL_ABI=6.1.0-56-amd64 tests/vm/prepare.sh
#
# Output (under $LIVECLONE_VM_CACHE, default ~/.cache/liveclone/vm):
#   <abi>_<debian-version>_<recipe>/vmlinuz        the Debian kernel, unmodified
#   <abi>_<debian-version>_<recipe>/modroot/lib/modules/<abi>/
#                                         its modules plus updates/dm-clone.ko
#   <abi>_<debian-version>_<recipe>/initramfs.cpio.gz
#                                         busybox + the modules needed to mount
#                                         the host root over virtio-9p
#   <abi>_<debian-version>_<recipe>/kernel.env     ABI, package version, paths
#   current                               name of the entry prepared last
#
# Why a Debian kernel and a module built out of tree: Debian builds without
# CONFIG_DM_CLONE, and the host kernel has no device-mapper at all. The module
# is built from Debian's own source package at exactly the image's version.
set -euo pipefail

log() { printf 'vm-prepare: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Without HOME (some CI environments), fall back to a system cache folder;
# crates/vmtest/src/cache.rs resolves the same way.
if [ -n "${HOME:-}" ]; then DEFAULT_CACHE="$HOME/.cache"; else DEFAULT_CACHE=/var/cache; fi
CACHE_ROOT="${LIVECLONE_VM_CACHE:-${XDG_CACHE_HOME:-$DEFAULT_CACHE}/liveclone/vm}"
mkdir -p "$CACHE_ROOT"

# Host tools: QEMU, the busybox that becomes the guest's init, kmod for depmod
# and module ordering, the compiler for the module, and the userspace tools the
# tests run inside the guest (the guest shares the host's root filesystem).
HOST_PACKAGES=(
    qemu-system-x86 busybox-static kmod cpio gzip xz-utils
    build-essential bc flex bison libelf-dev libssl-dev
    dmsetup e2fsprogs xfsprogs util-linux lvm2 thin-provisioning-tools iproute2
)

APT_LIB_NAME=vm-prepare
# shellcheck source=tests/tools/apt-lib.sh
source "$(dirname "$0")/../tools/apt-lib.sh"

install_packages "${HOST_PACKAGES[@]}"

# Resolve the kernel: an explicit ABI wins; otherwise follow the metapackage,
# because Debian's security archive drops old kernel versions as it moves on.
resolve_abi() {
    if [ -n "${LIVECLONE_VM_KERNEL_ABI:-}" ]; then
        printf '%s\n' "$LIVECLONE_VM_KERNEL_ABI"
        return
    fi
    local dep
    dep="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    if [ -z "$dep" ]; then
        apt_update_once
        dep="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    fi
    [ -n "$dep" ] || die "cannot resolve the kernel from linux-image-amd64"
    printf '%s\n' "${dep#linux-image-}"
}

ABI="$(resolve_abi)"
[[ "$ABI" =~ ^[0-9]+\.[0-9]+\.[0-9]+-[0-9]+-amd64$ ]] || die "unexpected kernel ABI '$ABI'"
PKG_VERSION="$(apt-cache show --no-all-versions "linux-image-$ABI" 2>/dev/null | awk '/^Version:/ {print $2; exit}')"
if [ -z "$PKG_VERSION" ]; then
    apt_update_once
    PKG_VERSION="$(apt-cache show --no-all-versions "linux-image-$ABI" | awk '/^Version:/ {print $2; exit}')"
fi
[ -n "$PKG_VERSION" ] || die "linux-image-$ABI is not in the package lists"
SERIES="$(printf '%s' "$ABI" | cut -d. -f1,2)"

# The recipe (this script, the guest init and the shared dm-clone module
# build) is part of the key, so a change to any of them rebuilds instead of
# silently reusing an old initramfs or module.
HERE="$(cd "$(dirname "$0")" && pwd)"
DM_CLONE_MODULE_SCRIPT="$HERE/../../deploy/dm-clone/build-module.sh"
RECIPE="$(cat "$HERE/prepare.sh" "$HERE/init" "$DM_CLONE_MODULE_SCRIPT" | sha256sum | cut -c1-12)"
KEY="${ABI}_${PKG_VERSION}_${RECIPE}"
DIR="$CACHE_ROOT/$KEY"
if [ -f "$DIR/.complete" ]; then
    log "cache hit: $DIR"
    printf '%s\n' "$KEY" > "$CACHE_ROOT/current"
    printf '%s\n' "$DIR"
    exit 0
fi

log "preparing kernel $ABI (Debian $PKG_VERSION) into $DIR"
rm -rf "$DIR"
WORK="$DIR.partial"
rm -rf "$WORK"
mkdir -p "$WORK/debs"
trap 'rm -rf "$WORK"' EXIT

# Headers are installed (the module build needs the packaged kbuild tree);
# the image and the source are only unpacked into the cache, so the host's
# /boot and /lib/modules are left alone.
install_packages "linux-headers-$ABI"
HEADERS_VERSION="$(dpkg-query -W -f='${Version}' "linux-headers-$ABI")"
[ "$HEADERS_VERSION" = "$PKG_VERSION" ] ||
    die "linux-headers-$ABI is $HEADERS_VERSION, the image is $PKG_VERSION: they must match"

(
    cd "$WORK/debs"
    log "downloading linux-image-$ABI and linux-source-$SERIES at $PKG_VERSION"
    apt-get download -q "linux-image-$ABI=$PKG_VERSION" "linux-source-$SERIES=$PKG_VERSION" 2>&1 |
        grep -v 'couldn.t be accessed by user' >&2 || true
)
IMAGE_DEB="$(ls "$WORK"/debs/linux-image-"$ABI"_*.deb)"
SOURCE_DEB="$(ls "$WORK"/debs/linux-source-"$SERIES"_*.deb)"

mkdir -p "$WORK/image" "$WORK/source"
dpkg-deb -x "$IMAGE_DEB" "$WORK/image"
dpkg-deb -x "$SOURCE_DEB" "$WORK/source"

# The module recipe is shared with the node builder image
# (deploy/dm-clone/build-dm-clone.sh): building it here proves it on every
# fresh machine.
bash "$DM_CLONE_MODULE_SCRIPT" \
    --source-tarball "$WORK/source/usr/src/linux-source-$SERIES.tar.xz" \
    --kbuild "/usr/src/linux-headers-$ABI" --release "$ABI" --out "$WORK/dm-clone"

mkdir -p "$WORK/out/modroot/lib/modules"
mv "$WORK/image/lib/modules/$ABI" "$WORK/out/modroot/lib/modules/"
mkdir -p "$WORK/out/modroot/lib/modules/$ABI/updates"
cp "$WORK/dm-clone/dm-clone.ko" "$WORK/out/modroot/lib/modules/$ABI/updates/"
depmod -b "$WORK/out/modroot" "$ABI"
cp "$WORK/image/boot/vmlinuz-$ABI" "$WORK/out/vmlinuz"
cp "$WORK/image/boot/config-$ABI" "$WORK/out/config"

log "building the initramfs"
INITRD="$WORK/initrd"
mkdir -p "$INITRD"/{bin,mods,proc,sys,dev,lower,upper,newroot}
cp /bin/busybox "$INITRD/bin/busybox"
file_is_static() { ! ldd "$1" >/dev/null 2>&1; }
file_is_static "$INITRD/bin/busybox" || die "/bin/busybox is not static (busybox-static missing?)"
# Exactly the modules needed to reach the host root: virtio-pci, 9p, overlay.
: > "$INITRD/mods/order"
for mod in virtio_pci 9pnet_virtio 9p overlay; do
    modprobe -d "$WORK/out/modroot" -S "$ABI" --show-depends "$mod"
done | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$INITRD/mods/"
    basename "$ko" >> "$INITRD/mods/order"
done
cp "$HERE/init" "$INITRD/init"
chmod 0755 "$INITRD/init"
(cd "$INITRD" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$WORK/out/initramfs.cpio.gz"

cat > "$WORK/out/kernel.env" <<EOF
KERNEL_ABI=$ABI
KERNEL_PACKAGE_VERSION=$PKG_VERSION
EOF

mv "$WORK/out" "$DIR"
touch "$DIR/.complete"
printf '%s\n' "$KEY" > "$CACHE_ROOT/current"
# Older recipes for the same kernel are dead weight (about 400 MiB each).
for old in "$CACHE_ROOT/${ABI}_"*; do
    if [ -d "$old" ] && [ "$old" != "$DIR" ]; then
        log "removing stale cache entry $old"
        rm -rf "$old"
    fi
done
log "ready: $DIR"
printf '%s\n' "$DIR"
