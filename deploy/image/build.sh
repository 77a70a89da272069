#!/usr/bin/env bash
# The container image's build commands, in one place: the Dockerfile's stages
# call these subcommands, and CI calls them on the host (`make image-check`),
# so what CI checks is what the image runs.
#
#   build.sh build-deps              Debian packages needed to compile the driver
#   build.sh compile <outdir>        cargo build of the `liveclone` binary into
#                                    <outdir>/liveclone, then check-binary on it
#                                    (LIVECLONE_BUILD_PROFILE: release (default) or dev)
#   build.sh check-binary <file>     the binary links only the C library and
#                                    friends present in debian:bookworm-slim
#   build.sh runtime-deps            installs the node tools (root; for the image)
#   build.sh check-runtime           every program the driver runs is on PATH and
#                                    comes from a package listed here; with the
#                                    sources present, also that this list names
#                                    every program the driver's code runs
#   build.sh builder-deps            packages of the dm-clone-builder image
#   build.sh check-dockerfile [file] the Dockerfile calls only subcommands that
#                                    exist and copies only paths that exist
set -euo pipefail

log() { printf 'image-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

# The node's tools. What the driver executes itself (crates/liveclone/src/os,
# ToolCommand) and what those tools execute in turn, with the package that
# must provide each; check-runtime proves both columns on a real system.
#   program      package                   run by
DRIVER_PROGRAMS=(
    "lvm         lvm2                      driver: every LVM report and change"
    "blkid       util-linux                driver: what is on a device"
    "mkfs.ext4   e2fsprogs                 driver: NodeStage format"
    "resize2fs   e2fsprogs                 driver: ext4 expansion"
    "mkfs.xfs    xfsprogs                  driver: NodeStage format"
    "xfs_growfs  xfsprogs                  driver: xfs expansion"
    "xfs_admin   xfsprogs                  driver: new UUID for a cloned xfs"
    "modprobe    kmod                      driver: loads dm-clone when the kernel has it"
)
INDIRECT_PROGRAMS=(
    "xfs_db      xfsprogs                  xfs_admin (it is a script around xfs_db)"
    "sh          dash                      xfs_admin's interpreter (#!/bin/sh)"
    "thin_check  thin-provisioning-tools   lvm, when it activates a thin pool"
)
# What runtime-deps installs: the packages above (util-linux and dash are
# already in debian:bookworm-slim, being essential) and nothing else.
RUNTIME_PACKAGES=(e2fsprogs xfsprogs util-linux lvm2 thin-provisioning-tools kmod)
# The dm-clone-builder image: the compiler and make for the kernel's kbuild
# (the headers package installed at run time pulls its own gcc-12 and kbuild
# tools), xz for the source tarball, kmod for modinfo/modprobe/insmod,
# dmsetup to see whether the clone target is registered, ca-certificates for
# the archive over https.
BUILDER_PACKAGES=(make gcc libc6-dev xz-utils kmod dmsetup ca-certificates)
# The same for the EL9 builder (AlmaLinux base): dnf's download plugin for
# the source RPM, rpm2cpio (rpm) and cpio to open it, and kernel-devel's
# build requirements that it does not pull itself (gcc, make, libelf).
BUILDER_PACKAGES_EL9=(dnf-plugins-core rpm cpio tar xz make gcc elfutils-libelf-devel kmod device-mapper util-linux)

# Shared libraries the binary may need: glibc's and libgcc_s (the unwinder),
# all in packages that are essential in Debian, hence in bookworm-slim.
ALLOWED_NEEDED_REGEX='^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1)$'
# debian:bookworm-slim's glibc; a newer builder would produce a binary that
# does not start there.
RUNTIME_GLIBC=2.36

SUBCOMMANDS=(build-deps compile check-binary runtime-deps check-runtime builder-deps check-dockerfile)

field() { # field <n> <row>
    awk -v n="$1" '{print $n}' <<<"$2"
}

apt_install_clean() {
    [ "$(id -u)" -eq 0 ] || die "installing packages needs root (this is for image builds)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@"
    apt-get clean
    rm -rf /var/lib/apt/lists/*
}

cmd_build_deps() {
    bash "$ROOT/tests/tools/install-build-deps.sh"
}

cmd_compile() {
    local outdir="${1:-}"
    [ -n "$outdir" ] || die "usage: build.sh compile <outdir>"
    local profile="${LIVECLONE_BUILD_PROFILE:-release}" profile_dir
    case "$profile" in
        dev) profile_dir=debug ;;
        release) profile_dir=release ;;
        *) die "LIVECLONE_BUILD_PROFILE must be dev or release, not '$profile'" ;;
    esac
    cd "$ROOT"
    if [ "$profile" = release ]; then
        # Build scripts that embed a time (the C compiler driver `cc` of
        # ring and psm reads it) take this one: the commit's time when there
        # is a checkout, else 0 (the Docker context leaves .git out), so two
        # builds of one commit agree.
        if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
            SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)"
        fi
        export SOURCE_DATE_EPOCH
        # Paths of the checkout and of the cargo home are written into the
        # binary (panic messages, debug info): map them to fixed names so
        # the binary does not depend on where it was built; strip symbols in
        # the link.
        local cargo_home="${CARGO_HOME:-$HOME/.cargo}"
        export RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$ROOT=/build/liveclone --remap-path-prefix=$cargo_home=/cargo"
        export CARGO_PROFILE_RELEASE_STRIP=symbols
    else
        # None of that for dev: SOURCE_DATE_EPOCH is a build-script input
        # (cc reruns on it), and RUSTFLAGS or a profile change are part of
        # every crate's fingerprint; any of them would rebuild much of the
        # shared dev target dir that the tests use, and the tests' next run
        # would rebuild it back. The dev binary is for CI's checks only.
        unset SOURCE_DATE_EPOCH
    fi
    log "cargo build --locked --profile $profile -p liveclone --bin liveclone"
    cargo build --locked --profile "$profile" -p liveclone --bin liveclone
    local built="${CARGO_TARGET_DIR:-$ROOT/target}/$profile_dir/liveclone"
    [ -x "$built" ] || die "cargo did not produce $built"
    mkdir -p "$outdir"
    # The dev build keeps its symbols in the shared target dir (see above);
    # the copy is stripped, as the release link already is.
    strip --strip-all -o "$outdir/liveclone.partial" "$built"
    mv "$outdir/liveclone.partial" "$outdir/liveclone"
    cmd_check_binary "$outdir/liveclone"
    log "$(sha256sum "$outdir/liveclone")"
}

cmd_check_binary() {
    local binary="${1:-}" lib needed=0 bad=0 glibc
    [ -f "$binary" ] || die "usage: build.sh check-binary <file>"
    file_type="$(readelf -h "$binary" | awk '/Type:/ {print $2}')"
    [ "$file_type" = DYN ] || [ "$file_type" = EXEC ] || die "$binary is not an ELF executable"
    while read -r lib; do
        needed=$((needed + 1))
        if ! [[ "$lib" =~ $ALLOWED_NEEDED_REGEX ]]; then
            log "$binary needs $lib, which debian:bookworm-slim may not have"
            bad=1
        fi
    done < <(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')
    [ "$needed" -gt 0 ] || die "$binary lists no shared libraries: not the dynamic glibc build expected"
    [ "$bad" -eq 0 ] || die "$binary links libraries outside the runtime image's base"
    # The newest glibc symbol version it asks for must exist in bookworm.
    glibc="$(readelf -V "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)"
    [ -n "$glibc" ] || die "$binary asks for no glibc symbol version: unexpected"
    if [ "$(printf '%s\n%s\n' "$glibc" "$RUNTIME_GLIBC" | sort -V | tail -n 1)" != "$RUNTIME_GLIBC" ]; then
        die "$binary needs glibc $glibc; the runtime image has $RUNTIME_GLIBC"
    fi
    if ldd "$binary" | grep -q 'not found'; then
        die "$binary has unresolved libraries here: $(ldd "$binary" | grep 'not found' | tr '\n' ' ')"
    fi
    log "check-binary: $binary needs $needed libraries, all from glibc/libgcc; newest glibc symbol $glibc <= $RUNTIME_GLIBC"
}

cmd_runtime_deps() {
    apt_install_clean "${RUNTIME_PACKAGES[@]}"
}

cmd_builder_deps() {
    if command -v apt-get >/dev/null; then
        apt_install_clean "${BUILDER_PACKAGES[@]}"
    elif command -v dnf >/dev/null; then
        [ "$(id -u)" -eq 0 ] || die "installing packages needs root (this is for image builds)"
        dnf -y -q install --setopt=install_weak_deps=False "${BUILDER_PACKAGES_EL9[@]}"
        dnf clean all
    else
        die "builder-deps needs apt-get (Debian) or dnf (EL9)"
    fi
}

# The package that owns a path, as dpkg records it. With merged /usr, a file
# dpkg knows as /sbin/x is found on PATH as /usr/sbin/x (and the reverse),
# so both spellings are asked.
owning_package() {
    local path="$1" alt candidates=() candidate owner
    case "$path" in
        /usr/sbin/* | /usr/bin/* | /usr/lib/*) alt="${path#/usr}" ;;
        /sbin/* | /bin/* | /lib/*) alt="/usr$path" ;;
        *) alt='' ;;
    esac
    candidates=("$path")
    [ -z "$alt" ] || candidates+=("$alt")
    for candidate in "${candidates[@]}"; do
        # "pkg: /path" (or "pkg1, pkg2: /path"); diversion lines are skipped.
        owner="$(dpkg -S "$candidate" 2>/dev/null | grep -v '^diversion by' | head -n 1 | cut -d: -f1)" || true
        if [ -n "$owner" ]; then
            printf '%s\n' "$owner"
            return 0
        fi
    done
    return 1
}

is_essential() {
    [ "$(dpkg-query -W -f='${Essential}' "$1" 2>/dev/null)" = yes ]
}

# The programs the driver's code runs: literal names given to ToolCommand::new
# or LinuxLvm::with_program, outside test modules (which are at each file's
# end, after `#[cfg(test)]`).
programs_in_source() {
    local src="$ROOT/crates/liveclone/src" file
    while IFS= read -r -d '' file; do
        awk '/^#\[cfg\(test\)\]/ {exit} {print}' "$file" |
            { grep -o -E '(ToolCommand::new|with_program)\("[^"]+"' || true; } |
            sed -E 's/.*\("([^"]+)"/\1/'
    done < <(find "$src" -name '*.rs' -print0) | sort -u
}

cmd_check_runtime() {
    local row program package owner path failed=0 declared=()
    for row in "${DRIVER_PROGRAMS[@]}" "${INDIRECT_PROGRAMS[@]}"; do
        program="$(field 1 "$row")"
        package="$(field 2 "$row")"
        declared+=("$program")
        if ! path="$(command -v "$program")"; then
            log "MISSING: $program (from $package) is not on PATH"
            failed=1
            continue
        fi
        if ! owner="$(owning_package "$path")"; then
            log "MISSING: $path ($program) belongs to no package"
            failed=1
            continue
        fi
        if [ "$owner" != "$package" ]; then
            log "WRONG PACKAGE: $path comes from $owner, the list says $package"
            failed=1
            continue
        fi
        if ! printf '%s\n' "${RUNTIME_PACKAGES[@]}" | grep -qx "$package" && ! is_essential "$package"; then
            log "NOT INSTALLED BY runtime-deps: $package ($program) is neither listed nor essential"
            failed=1
            continue
        fi
        printf '  %-11s %-28s %s\n' "$program" "$path" "$owner"
    done
    # A program the driver runs but this script does not know of would be
    # missing from the image without anyone noticing: the sources decide.
    # (In the image build the sources are not copied in; CI runs this on the
    # checkout.)
    if [ -d "$ROOT/crates/liveclone/src" ]; then
        local in_source
        mapfile -t in_source < <(programs_in_source)
        [ "${#in_source[@]}" -gt 0 ] || { log "found no ToolCommand programs in the sources: has the API changed?"; failed=1; }
        local undeclared=0
        for program in "${in_source[@]}"; do
            if ! printf '%s\n' "${declared[@]}" | grep -qxF "$program"; then
                log "UNDECLARED: the driver runs '$program' (crates/liveclone/src); add it to DRIVER_PROGRAMS"
                undeclared=1
            fi
        done
        [ "$undeclared" -eq 0 ] || failed=1
        # Programs named any other way would escape the scan above: a process
        # started outside os/command.rs, or a ToolCommand whose program is
        # not a literal (the one known case is LinuxLvm's, set through
        # with_program).
        local escaped
        escaped="$(grep -rn --include='*.rs' -E '(^|[^A-Za-z_])Command::new\(|process::Command' "$ROOT/crates/liveclone/src" |
            grep -v '^[^:]*/os/command\.rs:' || true)"
        escaped+="$(grep -rn --include='*.rs' -E 'ToolCommand::new\([^"]' "$ROOT/crates/liveclone/src" |
            grep -v -F 'ToolCommand::new(&self.program' || true)"
        if [ -n "$escaped" ]; then
            log "the driver starts processes this check cannot name:"
            printf '%s\n' "$escaped" >&2
            failed=1
        fi
        if [ "$undeclared" -eq 0 ]; then
            log "check-runtime: the sources run ${#in_source[@]} programs (${in_source[*]}), all declared"
        fi
    else
        log "check-runtime: no sources here; checked the declared list only"
    fi
    [ "$failed" -eq 0 ] || die "check-runtime failed"
    log "check-runtime: ${#declared[@]} programs present, each from its declared package"
}

# The Dockerfile's instructions, one per line: comments dropped, lines
# ending in a backslash joined with the next.
dockerfile_instructions() {
    awk '
        /^[[:space:]]*#/ { next }
        {
            line = $0
            sub(/^[[:space:]]+/, "", line)
            if (line ~ /\\$/) { sub(/\\$/, "", line); acc = acc line " "; next }
            acc = acc line
            if (acc != "") print acc
            acc = ""
        }
        END { if (acc != "") print acc }
    ' "$1"
}

cmd_check_dockerfile() {
    local dockerfile="${1:-$ROOT/Dockerfile}" sub failed=0 calls=0 src line
    [ -f "$dockerfile" ] || die "no Dockerfile at $dockerfile"
    # Every `build.sh <subcommand>` in a RUN instruction (continuation lines
    # joined first; comments dropped) must be one this script dispatches.
    while IFS= read -r sub; do
        calls=$((calls + 1))
        if ! printf '%s\n' "${SUBCOMMANDS[@]}" | grep -qxF "$sub"; then
            log "$dockerfile calls 'build.sh $sub', which does not exist"
            failed=1
        fi
    done < <(dockerfile_instructions "$dockerfile" | grep -E '^RUN[[:space:]]' |
        grep -o -E 'build\.sh[[:space:]]+[A-Za-z0-9_-]+' | awk '{print $2}')
    [ "$calls" -gt 0 ] || { log "$dockerfile never calls build.sh"; failed=1; }
    # Every local COPY source must exist in the build context (the repo).
    while IFS= read -r line; do
        # Drop the instruction, the flags and the destination (last word).
        read -r -a words <<<"$line"
        local n="${#words[@]}" i
        for ((i = 1; i < n - 1; i++)); do
            src="${words[$i]}"
            case "$src" in --*) continue ;; esac
            if ! compgen -G "$ROOT/$src" >/dev/null; then
                log "$dockerfile copies '$src', which is not in the repository"
                failed=1
            fi
        done
    done < <(dockerfile_instructions "$dockerfile" | grep -E '^COPY[[:space:]]' | grep -v -- '--from=')
    # cargo loads the whole workspace even for one package: every member
    # named in Cargo.toml must be inside a local COPY source.
    local copied member covered members=0
    copied="$(dockerfile_instructions "$dockerfile" | grep -E '^COPY[[:space:]]' | grep -v -- '--from=' |
        awk '{for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i}')"
    while IFS= read -r member; do
        members=$((members + 1))
        covered=0
        while IFS= read -r src; do
            src="${src%/}"
            case "$member/" in "$src"/*) covered=1 ;; esac
        done <<<"$copied"
        if [ "$covered" -eq 0 ]; then
            log "$dockerfile does not copy the workspace member $member (Cargo.toml): cargo would fail"
            failed=1
        fi
    done < <(awk '/^members[[:space:]]*=/ {on = 1} on {print} on && /\]/ {exit}' "$ROOT/Cargo.toml" |
        grep -o '"[^"]*"' | tr -d '"')
    [ "$members" -gt 0 ] || { log "found no workspace members in Cargo.toml"; failed=1; }
    [ "$failed" -eq 0 ] || die "check-dockerfile failed"
    log "check-dockerfile: $calls build.sh calls, all to existing subcommands; COPY sources present; all $members workspace members copied"
}

main() {
    local sub="${1:-}"
    [ $# -eq 0 ] || shift
    # SUBCOMMANDS is the one list: it dispatches here and check-dockerfile
    # checks against it.
    if [ -n "$sub" ] && printf '%s\n' "${SUBCOMMANDS[@]}" | grep -qxF -- "$sub"; then
        "cmd_${sub//-/_}" "$@"
    else
        sed -n '6,19p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
    fi
}

main "$@"
