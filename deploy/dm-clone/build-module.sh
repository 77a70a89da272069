#!/usr/bin/env bash
# Builds dm-clone.ko out of tree from a kernel source tarball and the kernel's
# build tree (its headers package), and checks that it was built for the
# expected kernel. The one recipe for the module, shared by:
#   - deploy/dm-clone/build-dm-clone.sh (the opt-in node builder image), and
#   - tests/vm/prepare.sh (the test VM's kernel), so every fresh CI machine
#     proves this recipe against a real distribution kernel.
#
#   build-module.sh --source-tarball <linux-*.tar.xz> --kbuild <dir> \
#                   --release <uname -r> --out <dir>
#
# --source-tarball  the distribution's kernel source as a tarball with one top
#                   folder (Debian: linux-source-<series>.tar.xz; EL9: the
#                   linux-<version>.tar.xz inside the kernel source RPM)
# --kbuild          the kernel's build tree (Debian: /usr/src/linux-headers-<release>;
#                   EL9: /usr/src/kernels/<release>)
# --release         the kernel release the module must be built for (vermagic)
# --out             where dm-clone.ko is written (created if missing)
#
# Only dm-clone's two C files and the headers they include (followed
# transitively inside drivers/md) are taken from the source: the rest of
# device-mapper (dm-mod, dm-bufio, dm-persistent-data) is the distribution's
# own modules, which dm-clone links against at load time.
set -euo pipefail

log() { printf 'build-dm-clone-module: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '9,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

tarball='' kbuild='' release='' out=''
while [ $# -gt 0 ]; do
    case "$1" in
        --source-tarball) tarball="${2:-}"; shift 2 || usage ;;
        --kbuild) kbuild="${2:-}"; shift 2 || usage ;;
        --release) release="${2:-}"; shift 2 || usage ;;
        --out) out="${2:-}"; shift 2 || usage ;;
        -h | --help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
if [ -z "$tarball" ] || [ -z "$kbuild" ] || [ -z "$release" ] || [ -z "$out" ]; then usage; fi
[ -f "$tarball" ] || die "no kernel source tarball at $tarball"
[ -f "$kbuild/Makefile" ] || die "$kbuild is not a kernel build tree (no Makefile)"
# The release names folders and is compared with vermagic: no slashes, no
# spaces, nothing a path could be tricked with.
[[ "$release" =~ ^[0-9]+\.[0-9]+[0-9A-Za-z._+~-]*$ ]] || die "unexpected kernel release '$release'"

work="$(mktemp -d "${TMPDIR:-/tmp}/dm-clone-module.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tree" "$work/module"

# One pass over the (xz-compressed, ~140 MiB) tarball: dm-clone's C files, the
# headers of drivers/md and persistent-data/. Which headers dm-clone needs
# differs between kernel versions (dm-ima.h exists since 5.15), so the
# include closure below picks them instead of a fixed list. `*` stops at `/`,
# so it only stands for the tarball's top folder.
log "extracting the dm-clone sources from $(basename "$tarball")"
tar -xf "$tarball" -C "$work/tree" --wildcards --no-wildcards-match-slash \
    '*/drivers/md/dm-clone-target.c' '*/drivers/md/dm-clone-metadata.c' \
    '*/drivers/md/*.h' '*/drivers/md/persistent-data/*.h' ||
    die "cannot extract drivers/md from $tarball"
shopt -s nullglob
md_dirs=("$work"/tree/*/drivers/md)
shopt -u nullglob
[ "${#md_dirs[@]}" -eq 1 ] || die "expected one top folder holding drivers/md in $tarball"
md="${md_dirs[0]}"

# The include closure: every `#include "..."` of the files taken so far,
# resolved relative to the including file (as the compiler does), kept when
# it lies inside drivers/md. Headers outside (linux/..., <...>) come from the
# build tree.
queue=(dm-clone-target.c dm-clone-metadata.c)
declare -A taken=()
while [ "${#queue[@]}" -gt 0 ]; do
    rel="${queue[0]}"
    queue=("${queue[@]:1}")
    [ -z "${taken[$rel]:-}" ] || continue
    [ -f "$md/$rel" ] || die "drivers/md/$rel is missing from $tarball"
    taken[$rel]=1
    dir="$(dirname "$rel")"
    while IFS= read -r inc; do
        if [ "$dir" = . ]; then cand="$inc"; else cand="$dir/$inc"; fi
        cand="$(realpath -m --relative-to="$md" "$md/$cand")"
        case "$cand" in ../* | /*) continue ;; esac
        if [ -f "$md/$cand" ]; then queue+=("$cand"); fi
    done < <(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$md/$rel")
done
for rel in "${!taken[@]}"; do
    mkdir -p "$work/module/$(dirname "$rel")"
    cp "$md/$rel" "$work/module/$rel"
done
log "taken from drivers/md: $(printf '%s\n' "${!taken[@]}" | sort | tr '\n' ' ')"

printf 'obj-m += dm-clone.o\ndm-clone-y += dm-clone-target.o dm-clone-metadata.o\n' > "$work/module/Kbuild"

log "building dm-clone.ko against $kbuild"
jobs="$(nproc 2>/dev/null || echo 1)"
make -s -j"$jobs" -C "$kbuild" M="$work/module" modules >"$work/build.log" 2>&1 ||
    { tail -n 40 "$work/build.log" >&2; die "dm-clone build failed (log above)"; }

# vermagic's first word is the release the kernel will compare at load time.
vermagic="$(modinfo -F vermagic "$work/module/dm-clone.ko")"
[ "${vermagic%% *}" = "$release" ] ||
    die "dm-clone.ko was built for '${vermagic%% *}', not $release: wrong build tree?"

mkdir -p "$out"
cp "$work/module/dm-clone.ko" "$out/dm-clone.ko.partial"
mv "$out/dm-clone.ko.partial" "$out/dm-clone.ko"
log "built $out/dm-clone.ko (vermagic: $vermagic)"
