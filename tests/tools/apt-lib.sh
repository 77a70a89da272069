# Shared by the project's install scripts (source it, do not run it):
# installs Debian packages that are missing, with one `apt-get update` at
# most, as root or through sudo.

apt_lib_log() { printf '%s: %s\n' "${APT_LIB_NAME:-apt}" "$*" >&2; }

APT_SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        apt_lib_log "error: run as root or install sudo"
        exit 1
    fi
    APT_SUDO=(sudo)
fi

# `make test` runs several install scripts at once (the VM's preparation and
# the tools' builds start in the background beside the build's own packages):
# each apt-get call takes this lock first, because a second apt-get started
# while one runs fails at once on dpkg's or the package lists' lock.
APT_LOCK=/run/lock/liveclone-apt.lock
apt_locked() {
    "${APT_SUDO[@]}" flock "$APT_LOCK" "$@"
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        apt_lib_log "apt-get update"
        apt_locked apt-get update -qq
        apt_updated=1
    fi
}

missing_packages() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$pkg"
        fi
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_update_once
        apt_lib_log "installing: ${missing[*]}"
        apt_locked env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}
