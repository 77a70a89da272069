# Shared by build-go-tools.sh and build-k8s-tools.sh (source it, do not run
# it): finds a Go toolchain new enough for the tools, or fetches one.
#
# The caller defines log and die, and sets GO_MIN (the oldest Go that builds
# its tools) and GO_FETCH_VERSION (the Go fetched when the machine has none
# new enough), then calls enter_tools_cache before building anything.

# shellcheck source=tests/tools/apt-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-lib.sh"

# Sets TOOLS_ROOT to the tools cache and takes its lock (held until the
# script exits), then the Go environment for every build. The cache resolves
# as tests/vm/prepare.sh and crates/vmtest/src/cache.rs do, with tools/
# instead of vm/; LIVECLONE_TOOLS_CACHE moves it (crates/kubetest reads it
# the same way).
enter_tools_cache() {
    local default_cache
    if [ -n "${HOME:-}" ]; then default_cache="$HOME/.cache"; else default_cache=/var/cache; fi
    TOOLS_ROOT="${LIVECLONE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$default_cache}/liveclone/tools}"
    mkdir -p "$TOOLS_ROOT"
    TOOLS_ROOT="$(cd "$TOOLS_ROOT" && pwd -P)"
    # Two builds at once (parallel make, two checkouts, the two scripts)
    # would race on the same folders: take turns.
    exec 9>"$TOOLS_ROOT/.lock"
    flock 9
    # Without HOME, Go has nowhere for its module and build caches: keep
    # them in ours. With HOME, Go's usual caches are shared with the user's
    # other builds.
    if [ -z "${HOME:-}" ]; then
        export GOPATH="${GOPATH:-$TOOLS_ROOT/.gopath}"
        export GOCACHE="${GOCACHE:-$TOOLS_ROOT/.gocache}"
    fi
    # Sources through the module proxy only (no fallback to cloning from
    # GitHub), checked against the checksum database; the exact Go we chose,
    # never one a go.mod asks to switch to; none of the caller's GOFLAGS; no
    # go.work from a parent folder.
    export GOPROXY="${GOPROXY:-https://proxy.golang.org}"
    export GOSUMDB="${GOSUMDB:-sum.golang.org}"
    export GOTOOLCHAIN=local
    export GOFLAGS=""
    export GOWORK=off
    export CGO_ENABLED=0
}

# "1.26.8" from `go version` (prints "go version go1.26.8 linux/amd64").
go_version_of() {
    "$1" version 2>/dev/null | awk '{sub(/^go/, "", $3); print $3}'
}

# Is version $1 at least $2? (sort -V orders 1.9 < 1.19 < 1.25.0 correctly.)
version_at_least() {
    [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]
}

# Any Go on this machine, new or old: PATH first, then the usual places.
find_any_go() {
    local candidate
    for candidate in "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && [ -n "$(go_version_of "$candidate")" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

# Fetches Go $GO_FETCH_VERSION as the module golang.org/toolchain through the
# proxy, checked against the checksum database: what GOTOOLCHAIN=goX.Y.Z does
# inside Go >= 1.21, done by hand so that any older bootstrap Go (bookworm's
# 1.19 knows nothing of GOTOOLCHAIN) can do it too.
fetch_toolchain() {
    local bootstrap="$1" dest="$2"
    local os arch module work dir
    os="$("$bootstrap" env GOHOSTOS)"
    arch="$("$bootstrap" env GOHOSTARCH)"
    module="golang.org/toolchain@v0.0.1-go${GO_FETCH_VERSION}.${os}-${arch}"
    work="$dest.partial"
    rm -rf "$work" "$dest"
    mkdir -p "$work"
    log "downloading $module through $GOPROXY (bootstrap: Go $(go_version_of "$bootstrap"))"
    # Outside any module, with a private module cache (writable, so that it
    # can be removed after).
    dir="$(cd "$work" && GOMODCACHE="$work/modcache" GOFLAGS=-modcacherw \
        "$bootstrap" mod download -json "$module" |
        awk -F'"' '$2 == "Dir" {print $4}')"
    [ -n "$dir" ] && [ -f "$dir/bin/go" ] || die "downloading $module gave no bin/go"
    mv "$dir" "$dest"
    rm -rf "$work"
    # Module zips carry no file modes; the go command marks these executable
    # when it switches toolchains itself.
    chmod +x "$dest"/bin/* "$dest"/pkg/tool/*/*
    touch "$dest/.complete"
}

# The go command for the builds: the machine's own if new enough, else a
# toolchain cached by an earlier run, else one fetched now (bootstrapped by
# Debian's golang-go when the machine has no Go at all).
find_go() {
    local go_bin version fetched="$TOOLS_ROOT/go-$GO_FETCH_VERSION"
    if go_bin="$(find_any_go)"; then
        version="$(go_version_of "$go_bin")"
        if version_at_least "$version" "$GO_MIN"; then
            printf '%s\n' "$go_bin"
            return
        fi
        log "Go $version at $go_bin is older than $GO_MIN"
    fi
    if [ -f "$fetched/.complete" ]; then
        log "cache hit: Go $GO_FETCH_VERSION in $fetched"
    else
        if ! go_bin="$(find_any_go)"; then
            log "no Go found: installing Debian's golang-go to bootstrap Go $GO_FETCH_VERSION"
            install_packages golang-go ca-certificates
            go_bin="$(find_any_go)" || die "golang-go installed but no go command found"
        fi
        fetch_toolchain "$go_bin" "$fetched"
    fi
    printf '%s\n' "$fetched/bin/go"
}
