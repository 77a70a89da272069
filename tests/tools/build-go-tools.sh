#!/usr/bin/env bash
# Builds the Go programs that liveclone's tests drive, at pinned versions,
# from the Go module proxy (the only place Go sources come from), and caches
# each binary by version so that a second run only checks a stamp file.
#
#   tests/tools/build-go-tools.sh                  # every tool; prints "NAME PATH" lines
#   tests/tools/build-go-tools.sh csi-sanity       # only the named tools
#   tests/tools/build-go-tools.sh --path csi-sanity    # print only the path
#
# Output (under $LIVECLONE_TOOLS_CACHE, default ~/.cache/liveclone/tools, or
# /var/cache/liveclone/tools without HOME; beside the VM bench's cache):
#   <tool>-<version>/<tool>       the binary
#   <tool>-<version>/build.env    what built it (package, Go version)
#   go-<version>/                 a Go toolchain, only when the machine has no
#                                 Go new enough (see find_go in go-lib.sh)
#
# Adding a tool is one line in TOOLS. A tool that `go install pkg@version`
# cannot build (kube-apiserver: its go.mod replaces the staging modules with
# local paths) needs its own build function next to build_go_install.
set -euo pipefail

log() { printf 'tools: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# name          version   package                                              version variable (-X), or -
TOOLS=(
    "csi-sanity    v5.6.0    github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity    main.VERSION"
)

# The oldest Go that builds every tool above: the highest `go` line among
# their go.mod files (csi-test v5.6.0 says `go 1.25.0`).
GO_MIN=1.25
# The toolchain fetched through the module proxy when the machine's Go is
# older than GO_MIN or missing (Debian bookworm's golang-go is 1.19).
GO_FETCH_VERSION=1.26.8

# --- arguments ---------------------------------------------------------------

print_path_only=0
wanted=()
for arg in "$@"; do
    case "$arg" in
        --path) print_path_only=1 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) die "unknown option $arg" ;;
        *) wanted+=("$arg") ;;
    esac
done

# --- cache root and Go environment ------------------------------------------

# shellcheck source=tests/tools/go-lib.sh
source "$(dirname "$0")/go-lib.sh"
enter_tools_cache

# --- tools -------------------------------------------------------------------

GO=""

# `go install pkg@version` into a fresh folder, then the folder becomes the
# cache entry in one rename, so an interrupted build never looks complete.
build_go_install() {
    local name="$1" version="$2" package="$3" version_var="$4" dir="$5"
    local work="$dir.partial" ldflags=""
    if [ "$version_var" != "-" ]; then ldflags="-X $version_var=$version"; fi
    rm -rf "$work"
    mkdir -p "$work"
    log "building $name $version from $package (Go $(go_version_of "$GO"))"
    (cd "$work" && GOBIN="$work" "$GO" install -trimpath -ldflags="$ldflags" "$package@$version")
    [ -x "$work/$name" ] || die "go install left no $name binary in $work"
    cat > "$work/build.env" <<EOF
TOOL=$name
VERSION=$version
PACKAGE=$package
GO_VERSION=$(go_version_of "$GO")
EOF
    rm -rf "$dir"
    mv "$work" "$dir"
    touch "$dir/.complete"
}

is_wanted() {
    local name="$1" want
    [ "${#wanted[@]}" -eq 0 ] && return 0
    for want in "${wanted[@]}"; do
        [ "$want" = "$name" ] && return 0
    done
    return 1
}

known=()
for line in "${TOOLS[@]}"; do
    read -r name _ <<<"$line"
    known+=("$name")
done
for want in "${wanted[@]}"; do
    [[ " ${known[*]} " == *" $want "* ]] || die "unknown tool '$want' (known: ${known[*]})"
done

for line in "${TOOLS[@]}"; do
    read -r name version package version_var <<<"$line"
    is_wanted "$name" || continue
    dir="$TOOLS_ROOT/$name-$version"
    if [ -f "$dir/.complete" ] && [ -x "$dir/$name" ]; then
        log "cache hit: $name $version in $dir"
    else
        if [ -z "$GO" ]; then GO="$(find_go)"; fi
        start=$SECONDS
        build_go_install "$name" "$version" "$package" "$version_var" "$dir"
        log "built $name $version in $((SECONDS - start)) s"
    fi
    if [ "$print_path_only" -eq 1 ]; then
        printf '%s\n' "$dir/$name"
    else
        printf '%s %s\n' "$name" "$dir/$name"
    fi
done
