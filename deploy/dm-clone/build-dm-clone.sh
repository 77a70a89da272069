#!/usr/bin/env bash
# The opt-in dm-clone module builder for nodes whose distribution kernel is
# built without CONFIG_DM_CLONE (Debian 12, RHEL 9 and its rebuilds). Runs in
# the dm-clone-builder image (installed as /usr/local/bin/build-dm-clone), as
# root, with the host's files under /host (see docs/DM-CLONE.md).
#
#   build-dm-clone [--load] [--host-root[=]DIR] [--cache-dir[=]DIR]
#
# --load        also load the module (and the distribution's dm-mod, dm-bufio
#               and dm-persistent-data it needs) into the running kernel
# --host-root   where the host's /etc/os-release and /lib/modules are
#               (default /host)
# --cache-dir   where built modules are kept, one folder per kernel release
#               (default /var/lib/liveclone/dm-clone, a hostPath), so that a
#               restarted pod loads the module it built before
#
# Does nothing when the running kernel already has the clone target; loads
# the kernel's own module when its module tree has one. Refuses
# other distributions and kernels older than 5.7 (dm-clone's data-corruption
# and overflow fixes). The module itself is built by build-module.sh, the
# same recipe the test VM's preparation (tests/vm/prepare.sh) runs.
set -euo pipefail

log() { printf 'build-dm-clone: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '7,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

SELF_DIR="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
MODULE_SCRIPT="$SELF_DIR/build-module.sh"

load=0
host_root=/host
cache_root=/var/lib/liveclone/dm-clone
while [ $# -gt 0 ]; do
    case "$1" in
        --load) load=1; shift ;;
        --host-root) host_root="${2:-}"; shift 2 || usage ;;
        --host-root=*) host_root="${1#*=}"; shift ;;
        --cache-dir) cache_root="${2:-}"; shift 2 || usage ;;
        --cache-dir=*) cache_root="${1#*=}"; shift ;;
        -h | --help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
if [ -z "$host_root" ] || [ -z "$cache_root" ]; then usage; fi
[ -f "$MODULE_SCRIPT" ] || die "missing $MODULE_SCRIPT (broken image?)"

# The running kernel: the container shares it with the host. Tests may name
# another one (LIVECLONE_DM_CLONE_RELEASE, LIVECLONE_DM_CLONE_KERNEL_VERSION:
# what `uname -r` and `uname -v` would say) to build without loading.
release="${LIVECLONE_DM_CLONE_RELEASE:-$(uname -r)}"
kernel_version="${LIVECLONE_DM_CLONE_KERNEL_VERSION:-$(uname -v)}"
# The release names folders and packages: letters, digits and . _ + ~ - only.
[[ "$release" =~ ^[0-9]+\.[0-9]+[0-9A-Za-z._+~-]*$ ]] || die "unexpected kernel release '$release'"
if [ "$load" -eq 1 ] && [ -n "${LIVECLONE_DM_CLONE_RELEASE:-}" ]; then
    die "--load loads into the running kernel; unset LIVECLONE_DM_CLONE_RELEASE"
fi

clone_target_present() {
    [ -d /sys/module/dm_clone ] && return 0
    command -v dmsetup >/dev/null && dmsetup targets 2>/dev/null | awk '$1 == "clone" {found = 1} END {exit !found}'
}

if [ "$load" -eq 1 ] && clone_target_present; then
    log "the running kernel ($release) already has the clone target: nothing to do"
    exit 0
fi

# dm-clone's fixes for data corruption (5.4.6/5.5) and overflows (5.7).
kernel_major="${release%%.*}"
kernel_minor="${release#*.}"; kernel_minor="${kernel_minor%%[!0-9]*}"
if [ "$kernel_major" -lt 5 ] || { [ "$kernel_major" -eq 5 ] && [ "$kernel_minor" -lt 7 ]; }; then
    die "kernel $release is older than 5.7, which dm-clone needs for its data-safety fixes; upgrade the node's kernel"
fi

# A kernel that ships dm-clone (built in, or as a module in the host's
# tree: Fedora, Arch, a DKMS package) needs no build, whatever the
# distribution: load the host's own module. The target is only registered
# once the module is loaded, which the node plugin would also do; doing it
# here keeps an unsupported-distribution refusal from blocking such nodes.
host_modules="$host_root/lib/modules/$release"
if [ -z "${LIVECLONE_DM_CLONE_RELEASE:-}" ] && [ -d "$host_modules" ]; then
    if grep -q '/dm-clone\.ko' "$host_modules/modules.builtin" 2>/dev/null; then
        log "dm-clone is built into the running kernel ($release): nothing to do"
        exit 0
    fi
    if modinfo -b "$host_root" -k "$release" dm-clone >/dev/null 2>&1; then
        if [ "$load" -eq 1 ]; then
            modprobe -d "$host_root" dm-clone || die "the kernel's own dm-clone module failed to load (see dmesg)"
            log "loaded the running kernel's own dm-clone module: no build needed"
        else
            log "the running kernel ships dm-clone ($host_modules): no build needed"
        fi
        exit 0
    fi
fi

# /etc/os-release is read as KEY=value data, never sourced: it comes from
# the host and is not ours to execute.
os_release_value() {
    local key="$1" line value
    line="$(grep -E "^${key}=" "$host_root/etc/os-release" | tail -n 1)" || return 0
    value="${line#*=}"
    value="${value#\"}"; value="${value%\"}"
    value="${value#\'}"; value="${value%\'}"
    printf '%s\n' "$value"
}
[ -f "$host_root/etc/os-release" ] || die "no $host_root/etc/os-release: mount the host's /etc/os-release there"
os_id="$(os_release_value ID)"
os_version="$(os_release_value VERSION_ID)"
os_major="${os_version%%.*}"

case "$os_id:$os_major" in
    debian:12) distro=debian ;;
    rhel:9 | rocky:9 | almalinux:9 | centos:9) distro=el9 ;;
    *)
        die "unsupported host distribution '${os_id:-?} ${os_version:-?}': this builder supports Debian 12 and RHEL/Rocky/AlmaLinux 9. Kernels of other distributions (Fedora, Arch, Ubuntu) usually ship dm-clone, which the node plugin loads itself; otherwise build the kernel with CONFIG_DM_CLONE=m"
        ;;
esac

# What identifies a kernel build beyond its release: Debian can rebuild a
# kernel under the same ABI name, and `uname -v` carries the package
# version ("... Debian 6.1.192-2 (2026-...)"). On EL9 the release is the
# package's version-release already.
case "$distro" in
    debian)
        package_version="$(sed -n 's/.*Debian \([0-9][^ ]*\).*/\1/p' <<<"$kernel_version")"
        [[ "$package_version" =~ ^[0-9][0-9A-Za-z.+~:-]*$ ]] ||
            die "cannot read the kernel's Debian package version from uname -v ('$kernel_version')"
        ;;
    el9) package_version="$release" ;;
esac
identity="$release $package_version"

cache="$cache_root/$release"
mkdir -p "$cache"
# One builder per node is the plan (a DaemonSet), but a second one (a
# rollout's overlap) must wait rather than build into the same folder.
exec {lock_fd}>"$cache_root/.lock"
flock "$lock_fd"

cached_module_usable() {
    [ -f "$cache/dm-clone.ko" ] && [ -f "$cache/kernel" ] || return 1
    [ "$(cat "$cache/kernel")" = "$identity" ] || return 1
    local vermagic
    vermagic="$(modinfo -F vermagic "$cache/dm-clone.ko" 2>/dev/null)" || return 1
    [ "${vermagic%% *}" = "$release" ]
}

work=''
cleanup() { [ -z "$work" ] || rm -rf "$work"; }
trap cleanup EXIT

build_debian() {
    local series headers
    series="$(cut -d. -f1,2 <<<"$release")"
    headers="linux-headers-$release"
    log "installing $headers and fetching linux-source-$series, both at $package_version"
    export DEBIAN_FRONTEND=noninteractive
    # APT::Sandbox::User=root: apt would switch to its _apt user for
    # downloads, which a container without CAP_SETUID cannot.
    local apt_options=(-o APT::Sandbox::User=root)
    apt-get "${apt_options[@]}" update -qq
    # The exact version: headers of another build of the same ABI would
    # produce a module whose vermagic matches but whose structures may not.
    apt-get "${apt_options[@]}" install -y -qq --no-install-recommends "$headers=$package_version" ||
        die "$headers=$package_version is not in the archive (an older point release, dropped by Debian's security archive?); upgrade the node's kernel to the current bookworm kernel"
    (cd "$work" && apt-get "${apt_options[@]}" download -q "linux-source-$series=$package_version") ||
        die "linux-source-$series=$package_version is not in the archive"
    dpkg-deb -x "$work"/linux-source-"$series"_*.deb "$work/source"
    bash "$MODULE_SCRIPT" --source-tarball "$work/source/usr/src/linux-source-$series.tar.xz" \
        --kbuild "/usr/src/linux-headers-$release" --release "$release" --out "$work/out"
}

build_el9() {
    local arch version_release tarballs
    local tool
    for tool in dnf rpm2cpio cpio; do
        command -v "$tool" >/dev/null ||
            die "an EL9 host needs the EL9 builder image ($tool is missing here): see docs/DM-CLONE.md"
    done
    arch="$(uname -m)"
    version_release="${release%."$arch"}"
    log "installing kernel-devel-$release and fetching the kernel source RPM kernel-$version_release"
    dnf -y -q install "kernel-devel-$release" ||
        die "kernel-devel-$release is not in the enabled repositories"
    # Source RPMs live in separate repositories (baseos-source on Rocky and
    # AlmaLinux; a source-rpms repository on RHEL with a subscription).
    (cd "$work" && dnf -q download --source --enablerepo=baseos-source "kernel-$version_release") ||
        die "cannot download the source RPM kernel-$version_release"
    mkdir -p "$work/srpm"
    (cd "$work/srpm" && rpm2cpio "$work"/kernel-"$version_release".src.rpm | cpio -idm --quiet 'linux-*.tar.xz') ||
        die "the source RPM holds no linux-*.tar.xz"
    shopt -s nullglob
    tarballs=("$work"/srpm/linux-*.tar.xz)
    shopt -u nullglob
    [ "${#tarballs[@]}" -eq 1 ] || die "expected one linux-*.tar.xz in the source RPM"
    bash "$MODULE_SCRIPT" --source-tarball "${tarballs[0]}" \
        --kbuild "/usr/src/kernels/$release" --release "$release" --out "$work/out"
}

if cached_module_usable; then
    log "using the module built before: $cache/dm-clone.ko"
else
    work="$(mktemp -d "${TMPDIR:-/tmp}/build-dm-clone.XXXXXX")"
    "build_$distro"
    # Module first, identity last: an interrupted copy leaves no identity,
    # so the next start rebuilds instead of loading half a file.
    rm -f "$cache/kernel"
    cp "$work/out/dm-clone.ko" "$cache/dm-clone.ko.partial"
    mv "$cache/dm-clone.ko.partial" "$cache/dm-clone.ko"
    printf '%s\n' "$identity" > "$cache/kernel.partial"
    mv "$cache/kernel.partial" "$cache/kernel"
    log "built and cached $cache/dm-clone.ko for $identity"
fi

if [ "$load" -eq 0 ]; then
    exit 0
fi

# dm-clone's dependencies are the distribution's own modules, from the host's
# module tree (or built in, which modprobe accepts when modules.builtin
# says so).
[ -d "$host_root/lib/modules/$release" ] ||
    die "no $host_root/lib/modules/$release: mount the host's /lib/modules there"
modprobe -d "$host_root" -a dm-mod dm-bufio dm-persistent-data ||
    die "cannot load dm-mod, dm-bufio and dm-persistent-data from $host_root/lib/modules/$release"
if ! insmod "$cache/dm-clone.ko"; then
    # Another loader may have won the race; only its absence is an error.
    clone_target_present || die "insmod $cache/dm-clone.ko failed (see the kernel log: dmesg)"
fi
clone_target_present || die "dm-clone.ko loaded but the clone target is not registered"
log "dm-clone loaded into $release"
