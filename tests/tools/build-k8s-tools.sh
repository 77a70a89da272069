#!/usr/bin/env bash
# Builds the Kubernetes programs that liveclone's Kubernetes-mode tests run on
# loopback (kube-apiserver, kubectl, etcd, the CSI sidecars, and helm for the
# chart's test), at pinned
# versions, from the Go module proxy and Debian's archive, and caches each by
# version so that a second run only checks stamp files. Then writes an env
# file naming every binary (the contract with crates/kubetest; see
# docs/K8S-TESTING.md) and prints its path on stdout.
#
#   tests/tools/build-k8s-tools.sh          # build what is missing; print the env file's path
#   tests/tools/build-k8s-tools.sh --print  # ... and print the env file's contents instead
#
# KUBEBUILDER_ASSETS (envtest's convention): a folder holding etcd,
# kube-apiserver and kubectl. Each of the three that it holds is used as is
# and not built.
#
# Output (under $LIVECLONE_TOOLS_CACHE, default ~/.cache/liveclone/tools, or
# /var/cache/liveclone/tools without HOME; shared with build-go-tools.sh):
#   k8s.env                          KEY=VALUE lines, absolute paths (below)
#   <tool>-<version>/<tool>          a binary built from the module proxy
#   <tool>-<version>/build.env       what built it (module, Go version, seconds)
#   <tool>-<version>/src/go.mod      the generated wrapper module, with its go.sum
#   etcd-<debian version>/etcd       etcd taken out of Debian's etcd-server .deb
#   snapshot-crds-<version>/*.yaml   the VolumeSnapshot* CRDs
#   prometheus-crds-<version>/*.yaml the ServiceMonitor CRD (for the chart's test)
#   go-<version>/                    a Go toolchain, only when the machine's Go
#                                    is missing or too old
#
# Why a wrapper module: k8s.io/kubernetes replaces its staging modules
# (k8s.io/api, k8s.io/apiserver, ...) with local folders, and the sidecars'
# go.mod files carry replace directives too, so `go install pkg@version`
# refuses all of them. For each tool a small module is generated that requires
# the tool's module at the pinned version and repeats every replace directive
# of the tool's go.mod, with each local-folder replacement turned into the
# released module of the same content (k8s.io/<staging> v0.33.N for
# Kubernetes v1.33.N; external-snapshotter's client/v8 at the same tag). Its
# go.sum starts as the tool's own, so every dependency upstream pinned is
# checked against the hashes upstream committed. Builds use -trimpath and
# CGO_ENABLED=0, so the same versions and Go give the same bytes.
set -euo pipefail

log() { printf 'k8s-tools: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- pinned versions -------------------------------------------------------------

# The oldest Kubernetes the driver supports (k8s-openapi's v1_33 feature in
# crates/kubetest); the newest v1.33 patch release on the module proxy.
K8S_VERSION=v1.33.13
# The staging modules (k8s.io/api, ...) are released as v0.<minor>.<patch>.
K8S_STAGING_VERSION="v0.${K8S_VERSION#v1.}"
K8S_MINOR="${K8S_VERSION#v1.}"
K8S_MINOR="${K8S_MINOR%%.*}"
# The last v5 release of external-provisioner (built against k8s.io v0.33).
PROVISIONER_VERSION=v5.3.0
# external-snapshotter: the newest v8 release. Its in-tree client/ folder
# was released as client/v8 at the same tag, so the wrapper builds exactly
# the tagged sources. (v8.3.0 and v8.5.0 have no client tag of their own;
# v8.4.0 is missing from the checksum database as the proxy serves it.)
# Built against k8s.io v0.37; upstream states Kubernetes 1.20 as its minimum.
SNAPSHOTTER_VERSION=v8.7.0
SNAPSHOTTER_CLIENT_VERSION=v8.7.0
# Helm, for charts/liveclone's test (crates/liveclone/tests/k8s_chart.rs):
# the newest v3 release on the module proxy. v3 rather than v4 because v3 is
# what most clusters' operators still run; the chart (apiVersion v2) uses
# nothing v4 would read differently. Its go.mod has no replace directives.
HELM_VERSION=v3.22.0

K8S_LDFLAGS=(
    -s -w
    -X "k8s.io/component-base/version.gitVersion=$K8S_VERSION"
    -X "k8s.io/component-base/version.gitMajor=1"
    -X "k8s.io/component-base/version.gitMinor=$K8S_MINOR"
    -X "k8s.io/component-base/version.gitTreeState=clean"
    -X "k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    -X "k8s.io/client-go/pkg/version.gitMajor=1"
    -X "k8s.io/client-go/pkg/version.gitMinor=$K8S_MINOR"
    -X "k8s.io/client-go/pkg/version.gitTreeState=clean"
)

# name                 version               module                                              package                                                                 version of local replacements
GO_TOOLS=(
    "kube-apiserver      $K8S_VERSION          k8s.io/kubernetes                                   k8s.io/kubernetes/cmd/kube-apiserver                                    $K8S_STAGING_VERSION"
    "kubectl             $K8S_VERSION          k8s.io/kubernetes                                   k8s.io/kubernetes/cmd/kubectl                                           $K8S_STAGING_VERSION"
    "csi-provisioner     $PROVISIONER_VERSION  github.com/kubernetes-csi/external-provisioner/v5   github.com/kubernetes-csi/external-provisioner/v5/cmd/csi-provisioner   -"
    "csi-snapshotter     $SNAPSHOTTER_VERSION  github.com/kubernetes-csi/external-snapshotter/v8   github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter   $SNAPSHOTTER_CLIENT_VERSION"
    "snapshot-controller $SNAPSHOTTER_VERSION  github.com/kubernetes-csi/external-snapshotter/v8   github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller $SNAPSHOTTER_CLIENT_VERSION"
    "helm                $HELM_VERSION         helm.sh/helm/v3                                     helm.sh/helm/v3/cmd/helm                                                -"
)

# The CRDs live in the client module (config/crd/).
CRD_MODULE=github.com/kubernetes-csi/external-snapshotter/client/v8
CRD_FILES=(
    snapshot.storage.k8s.io_volumesnapshotclasses.yaml
    snapshot.storage.k8s.io_volumesnapshotcontents.yaml
    snapshot.storage.k8s.io_volumesnapshots.yaml
)

# The ServiceMonitor CRD (monitoring.coreos.com/v1), so that the chart's
# optional ServiceMonitor can be checked by a real API server. The
# prometheus-operator module carries its CRDs under
# example/prometheus-operator-crd/; v0.85.0 is the release the module proxy
# here serves. ServiceMonitor has been monitoring.coreos.com/v1 for years, so
# the exact release matters little; it is pinned all the same.
PROMETHEUS_OPERATOR_MODULE=github.com/prometheus-operator/prometheus-operator
PROMETHEUS_OPERATOR_VERSION=v0.85.0
PROMETHEUS_CRD_FILES=(
    monitoring.coreos.com_servicemonitors.yaml
)

# etcd: Debian's etcd-server package (bookworm: 3.4.23). kube-apiserver 1.33
# works with etcd 3.4 (checked by crates/kubetest's test); refuse older.
ETCD_DEB_PACKAGE="etcd-server"
ETCD_MIN=3.4.0

# The oldest Go that builds every tool above: the highest `go` line among
# their go.mod files (Kubernetes v1.33 and external-provisioner v5.3.0 say
# `go 1.24.0`, external-snapshotter v8.7.0 `go 1.26.0`).
GO_MIN=1.26
# Fetched through the module proxy when the machine's Go is older or missing
# (the same one as build-go-tools.sh, so the two share it).
GO_FETCH_VERSION=1.26.8

# --- arguments -------------------------------------------------------------------

print_contents=0
for arg in "$@"; do
    case "$arg" in
        --print) print_contents=1 ;;
        -h | --help) sed -n -e '/^set -euo/q' -e '2,$s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $arg (try --help)" ;;
    esac
done

# --- cache root and Go environment ------------------------------------------

# shellcheck source=tests/tools/go-lib.sh
source "$(dirname "$0")/go-lib.sh"
enter_tools_cache
ENV_FILE="$TOOLS_ROOT/k8s.env"

# The cache entry being built (NAME-VERSION.partial); removed if the script
# fails before it is complete, so that no half-built folder stays behind.
PARTIAL=""
remove_partial() {
    if [ -n "$PARTIAL" ]; then rm -rf "$PARTIAL"; fi
}
trap remove_partial EXIT

GO=""
need_go() {
    if [ -z "$GO" ]; then
        GO="$(find_go)"
        log "using Go $(go_version_of "$GO") at $GO"
    fi
}

# --- wrapper-module builds -------------------------------------------------------------

# Downloads module@version into the module cache (a no-op once there) and
# prints one field of `go mod download -json` (Dir: the sources, GoMod: the
# go.mod file).
module_field() {
    local module="$1" version="$2" field="$3" where="$4" json value
    # Exits non-zero when the download fails; the JSON then says why.
    json="$(cd "$where" && "$GO" mod download -json "$module@$version" || true)"
    value="$(printf '%s\n' "$json" | awk -F'"' -v field="$field" '$2 == field {print $4}')"
    if [ -z "$value" ]; then
        die "go mod download $module@$version gave no $field: $(printf '%s\n' "$json" |
            awk -F'"' '$2 == "Error" {print $4}')"
    fi
    printf '%s\n' "$value"
}

# The replace directives of a go.mod, one per line: OLD [OLDVERSION] => NEW [NEWVERSION].
replace_lines() {
    "$GO" mod edit -print "$1" | awk '
        { sub(/[ \t]*\/\/.*$/, "") }
        /^replace[ \t]*\($/ { block = 1; next }
        block && /^\)/ { block = 0; next }
        block && NF { sub(/^[ \t]+/, ""); print; next }
        /^replace[ \t]/ { sub(/^replace[ \t]+/, ""); print }
    '
}

# The go.mod's `go` version and its godebug settings (key=value, one per line).
go_line() {
    "$GO" mod edit -print "$1" | awk '$1 == "go" && NF == 2 {print $2; exit}'
}
godebug_lines() {
    "$GO" mod edit -print "$1" | awk '
        { sub(/[ \t]*\/\/.*$/, "") }
        /^godebug[ \t]*\($/ { block = 1; next }
        block && /^\)/ { block = 0; next }
        block && NF { print $1; next }
        /^godebug[ \t]/ { print $2 }
    '
}

# Writes the wrapper module for $module@$version into $src: requires the
# module, repeats its go and godebug lines and every replace directive, with
# local-folder replacements pointed at $local_version of the same module.
write_wrapper() {
    local name="$1" module="$2" version="$3" local_version="$4" src="$5"
    local upstream_mod upstream_dir go_version setting line old old_version new new_version
    local -a fields
    local replaced=0 localised=0
    upstream_mod="$(module_field "$module" "$version" GoMod "$src")"
    upstream_dir="$(module_field "$module" "$version" Dir "$src")"
    go_version="$(go_line "$upstream_mod")"
    [ -n "$go_version" ] || die "$module@$version: its go.mod has no go line"
    printf 'module liveclone.invalid/build/%s\n\ngo %s\n' "$name" "$go_version" > "$src/go.mod"
    (cd "$src" && "$GO" mod edit -require="$module@$version")
    while IFS= read -r setting; do
        [ -n "$setting" ] || continue
        (cd "$src" && "$GO" mod edit -godebug="$setting")
    done < <(godebug_lines "$upstream_mod")
    while IFS= read -r line; do
        read -r -a fields <<<"$line"
        old="${fields[0]}"
        old_version=""
        if [ "${fields[1]:-}" = "=>" ]; then
            new="${fields[2]:-}"
            new_version="${fields[3]:-}"
        else
            old_version="${fields[1]:-}"
            [ "${fields[2]:-}" = "=>" ] || die "$module@$version: cannot read replace line: $line"
            new="${fields[3]:-}"
            new_version="${fields[4]:-}"
        fi
        [ -n "$new" ] || die "$module@$version: cannot read replace line: $line"
        if [ -z "$new_version" ]; then
            # A folder of the upstream repository: use the released module.
            [ "$local_version" != "-" ] ||
                die "$module@$version replaces $old with the folder $new; give $name a version for local replacements"
            new="$old"
            new_version="$local_version"
            localised=$((localised + 1))
        fi
        if [ -n "$old_version" ]; then old="$old@$old_version"; fi
        (cd "$src" && "$GO" mod edit -replace="$old=$new@$new_version")
        replaced=$((replaced + 1))
    done < <(replace_lines "$upstream_mod")
    # Start from the checksums upstream committed: every dependency they
    # pin is then verified against them rather than looked up in the
    # checksum database (which only the wrapper's own additions need).
    if [ -f "$upstream_dir/go.sum" ]; then
        cp "$upstream_dir/go.sum" "$src/go.sum"
        chmod u+w "$src/go.sum"
    fi
    log "$name: wrapper module requires $module $version, go $go_version, $replaced replace directives ($localised local folders -> released modules)"
}

# The stamps helm's Makefile sets. Besides the version, it sets the
# Kubernetes version that `helm template` and `helm lint` assume when no
# cluster is asked (.Capabilities.KubeVersion): 1.<minor of the client-go
# helm is built against>. Without them helm would assume v1.20, and a chart
# whose kubeVersion says >=1.33 could not be rendered offline. Sets
# HELM_LDFLAGS.
HELM_LDFLAGS=()
helm_ldflags() {
    local version="$1" where="$2" upstream_mod client_go minor
    upstream_mod="$(module_field helm.sh/helm/v3 "$version" GoMod "$where")"
    client_go="$("$GO" mod edit -print "$upstream_mod" | awk '$1 == "k8s.io/client-go" {print $2; exit}')"
    [[ "$client_go" =~ ^v0\.([0-9]+)\. ]] || die "helm $version: cannot read its k8s.io/client-go version (got '$client_go')"
    minor="${BASH_REMATCH[1]}"
    HELM_LDFLAGS=(
        -X "helm.sh/helm/v3/internal/version.version=$version"
        -X "helm.sh/helm/v3/internal/version.gitTreeState=clean"
        -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
        -X "helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
        -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
        -X "helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
    )
}

build_wrapped() {
    local name="$1" version="$2" module="$3" package="$4" local_version="$5" dir="$6"
    local work="$dir.partial" start
    local -a ldflags=(-s -w)
    PARTIAL="$work"
    rm -rf "$work"
    mkdir -p "$work/src"
    start=$SECONDS
    write_wrapper "$name" "$module" "$version" "$local_version" "$work/src"
    if [ "$module" = k8s.io/kubernetes ]; then
        ldflags=("${K8S_LDFLAGS[@]}")
    elif [ "$module" = helm.sh/helm/v3 ]; then
        helm_ldflags "$version" "$work/src"
        ldflags+=("${HELM_LDFLAGS[@]}")
    else
        ldflags+=(-X "main.version=$version")
    fi
    log "building $name $version ($package, Go $(go_version_of "$GO"))"
    (cd "$work/src" && "$GO" build -mod=mod -trimpath -ldflags="${ldflags[*]}" -o "$work/$name" "$package")
    [ -x "$work/$name" ] || die "go build left no $name binary in $work"
    cat > "$work/build.env" <<EOF
TOOL=$name
VERSION=$version
MODULE=$module
PACKAGE=$package
LOCAL_REPLACEMENTS_VERSION=$local_version
GO_VERSION=$(go_version_of "$GO")
BUILD_SECONDS=$((SECONDS - start))
EOF
    rm -rf "$dir"
    mv "$work" "$dir"
    PARTIAL=""
    touch "$dir/.complete"
    log "built $name $version in $((SECONDS - start)) s"
}

# --- results ----------------------------------------------------------------------------

declare -A RESULT=()

# A binary from KUBEBUILDER_ASSETS, if the folder is given and holds it.
from_assets() {
    local name="$1"
    [ -n "${KUBEBUILDER_ASSETS:-}" ] || return 1
    if [ -x "$KUBEBUILDER_ASSETS/$name" ] && [ -f "$KUBEBUILDER_ASSETS/$name" ]; then
        log "using $name from KUBEBUILDER_ASSETS: $KUBEBUILDER_ASSETS/$name"
        printf '%s\n' "$(cd "$KUBEBUILDER_ASSETS" && pwd -P)/$name"
        return 0
    fi
    log "KUBEBUILDER_ASSETS ($KUBEBUILDER_ASSETS) holds no $name"
    return 1
}

for line in "${GO_TOOLS[@]}"; do
    read -r name version module package local_version <<<"$line"
    if [[ "$name" == kube-apiserver || "$name" == kubectl ]] && path="$(from_assets "$name")"; then
        RESULT[$name]="$path"
        continue
    fi
    dir="$TOOLS_ROOT/$name-$version"
    if [ -f "$dir/.complete" ] && [ -x "$dir/$name" ]; then
        log "cache hit: $name $version in $dir"
    else
        need_go
        build_wrapped "$name" "$version" "$module" "$package" "$local_version" "$dir"
    fi
    RESULT[$name]="$dir/$name"
done

# --- the VolumeSnapshot CRDs ------------------------------------------------------------

crd_dir="$TOOLS_ROOT/snapshot-crds-$SNAPSHOTTER_CLIENT_VERSION"
if [ -f "$crd_dir/.complete" ]; then
    log "cache hit: VolumeSnapshot CRDs $SNAPSHOTTER_CLIENT_VERSION in $crd_dir"
else
    need_go
    work="$crd_dir.partial"
    PARTIAL="$work"
    rm -rf "$work"
    mkdir -p "$work"
    source_dir="$(module_field "$CRD_MODULE" "$SNAPSHOTTER_CLIENT_VERSION" Dir "$work")"
    for file in "${CRD_FILES[@]}"; do
        [ -f "$source_dir/config/crd/$file" ] || die "$CRD_MODULE@$SNAPSHOTTER_CLIENT_VERSION has no config/crd/$file"
        # Module cache files are read-only; the copies need not be.
        cp "$source_dir/config/crd/$file" "$work/$file"
        chmod 0644 "$work/$file"
    done
    printf 'MODULE=%s\nVERSION=%s\n' "$CRD_MODULE" "$SNAPSHOTTER_CLIENT_VERSION" > "$work/build.env"
    rm -rf "$crd_dir"
    mv "$work" "$crd_dir"
    PARTIAL=""
    touch "$crd_dir/.complete"
    log "copied ${#CRD_FILES[@]} VolumeSnapshot CRDs from $CRD_MODULE@$SNAPSHOTTER_CLIENT_VERSION to $crd_dir"
fi

# --- the ServiceMonitor CRD -------------------------------------------------------------

prometheus_crd_dir="$TOOLS_ROOT/prometheus-crds-$PROMETHEUS_OPERATOR_VERSION"
if [ -f "$prometheus_crd_dir/.complete" ]; then
    log "cache hit: prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION in $prometheus_crd_dir"
else
    need_go
    work="$prometheus_crd_dir.partial"
    PARTIAL="$work"
    rm -rf "$work"
    mkdir -p "$work"
    source_dir="$(module_field "$PROMETHEUS_OPERATOR_MODULE" "$PROMETHEUS_OPERATOR_VERSION" Dir "$work")"
    for file in "${PROMETHEUS_CRD_FILES[@]}"; do
        [ -f "$source_dir/example/prometheus-operator-crd/$file" ] ||
            die "$PROMETHEUS_OPERATOR_MODULE@$PROMETHEUS_OPERATOR_VERSION has no example/prometheus-operator-crd/$file"
        cp "$source_dir/example/prometheus-operator-crd/$file" "$work/$file"
        chmod 0644 "$work/$file"
    done
    printf 'MODULE=%s\nVERSION=%s\n' "$PROMETHEUS_OPERATOR_MODULE" "$PROMETHEUS_OPERATOR_VERSION" > "$work/build.env"
    rm -rf "$prometheus_crd_dir"
    mv "$work" "$prometheus_crd_dir"
    PARTIAL=""
    touch "$prometheus_crd_dir/.complete"
    log "copied ${#PROMETHEUS_CRD_FILES[@]} prometheus-operator CRD from $PROMETHEUS_OPERATOR_MODULE@$PROMETHEUS_OPERATOR_VERSION to $prometheus_crd_dir"
fi

# --- etcd ------------------------------------------------------------------------------------

etcd_version_of() {
    "$1" --version 2>/dev/null | awk '$1 == "etcd" && $2 == "Version:" {print $3; exit}'
}

# etcd from Debian's package, unpacked into the cache rather than installed:
# installing etcd-server would also enable and start a system etcd service,
# which the tests neither need nor want. Sets $etcd.
etcd_from_debian() {
    local deb_version dir work deb
    command -v apt-cache >/dev/null || die "no etcd on PATH and no apt to fetch Debian's; put etcd on PATH or set KUBEBUILDER_ASSETS"
    deb_version="$(apt-cache show --no-all-versions "$ETCD_DEB_PACKAGE" 2>/dev/null | awk '$1 == "Version:" {print $2; exit}')"
    if [ -z "$deb_version" ]; then
        log "apt knows no $ETCD_DEB_PACKAGE yet: updating the package lists"
        apt_update_once
        deb_version="$(apt-cache show --no-all-versions "$ETCD_DEB_PACKAGE" 2>/dev/null | awk '$1 == "Version:" {print $2; exit}')"
        [ -n "$deb_version" ] || die "apt has no package $ETCD_DEB_PACKAGE"
    fi
    dir="$TOOLS_ROOT/etcd-$deb_version"
    if [ -f "$dir/.complete" ] && [ -x "$dir/etcd" ]; then
        log "cache hit: etcd (Debian $ETCD_DEB_PACKAGE $deb_version) in $dir"
    else
        work="$dir.partial"
        PARTIAL="$work"
        rm -rf "$work"
        mkdir -p "$work/deb" "$work/root"
        log "downloading Debian's $ETCD_DEB_PACKAGE $deb_version"
        # apt's download sandbox user may not write here; apt then warns and
        # downloads as the caller, which is fine.
        (cd "$work/deb" && apt-get download -qq "$ETCD_DEB_PACKAGE=$deb_version" 2>&1 |
            grep -v 'unsandboxed' >&2 || true)
        deb="$(find "$work/deb" -maxdepth 1 -name '*.deb' -print -quit)"
        [ -n "$deb" ] || die "apt-get download $ETCD_DEB_PACKAGE=$deb_version gave no .deb"
        dpkg-deb -x "$deb" "$work/root"
        [ -x "$work/root/usr/bin/etcd" ] || die "$deb holds no usr/bin/etcd"
        mv "$work/root/usr/bin/etcd" "$work/etcd"
        rm -rf "$work/deb" "$work/root"
        printf 'PACKAGE=%s\nVERSION=%s\n' "$ETCD_DEB_PACKAGE" "$deb_version" > "$work/build.env"
        rm -rf "$dir"
        mv "$work" "$dir"
        PARTIAL=""
        touch "$dir/.complete"
        log "unpacked etcd from $ETCD_DEB_PACKAGE $deb_version into $dir"
    fi
    etcd="$dir/etcd"
}

if etcd="$(from_assets etcd)"; then
    :
elif etcd="$(command -v etcd)"; then
    log "using etcd from PATH: $etcd"
else
    etcd_from_debian
fi
etcd_version="$(etcd_version_of "$etcd")"
[ -n "$etcd_version" ] || die "$etcd --version printed no version"
version_at_least "$etcd_version" "$ETCD_MIN" || die "etcd $etcd_version at $etcd is older than $ETCD_MIN"
RESULT[etcd]="$etcd"

# --- the env file ---------------------------------------------------------------------------

# Values are written unquoted so that the file is both sourceable and trivial
# to parse; refuse paths that would need quoting.
check_plain() {
    [[ "$1" =~ ^[A-Za-z0-9_./@%+=:,-]+$ ]] ||
        die "path '$1' has characters that k8s.env cannot hold unquoted; set LIVECLONE_TOOLS_CACHE to a plain path"
}

tmp="$ENV_FILE.tmp.$$"
{
    printf '# Written by tests/tools/build-k8s-tools.sh; read by crates/kubetest.\n'
    printf '# KEY=VALUE, absolute paths, no quoting. See docs/K8S-TESTING.md.\n'
    for pair in \
        "LIVECLONE_ETCD=${RESULT[etcd]}" \
        "LIVECLONE_KUBE_APISERVER=${RESULT[kube-apiserver]}" \
        "LIVECLONE_KUBECTL=${RESULT[kubectl]}" \
        "LIVECLONE_CSI_PROVISIONER=${RESULT[csi-provisioner]}" \
        "LIVECLONE_CSI_SNAPSHOTTER=${RESULT[csi-snapshotter]}" \
        "LIVECLONE_SNAPSHOT_CONTROLLER=${RESULT[snapshot-controller]}" \
        "LIVECLONE_SNAPSHOT_CRDS=$crd_dir" \
        "LIVECLONE_HELM=${RESULT[helm]}" \
        "LIVECLONE_PROMETHEUS_CRDS=$prometheus_crd_dir" \
        "LIVECLONE_K8S_VERSION=$K8S_VERSION" \
        "LIVECLONE_ETCD_VERSION=$etcd_version"; do
        check_plain "${pair#*=}"
        printf '%s\n' "$pair"
    done
} > "$tmp"
mv "$tmp" "$ENV_FILE"
log "wrote $ENV_FILE"

if [ "$print_contents" -eq 1 ]; then
    cat "$ENV_FILE"
else
    printf '%s\n' "$ENV_FILE"
fi
