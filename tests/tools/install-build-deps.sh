#!/usr/bin/env bash
# Installs what building the workspace needs beyond Rust: the `devicemapper`
# crate generates its ioctl bindings with bindgen (libclang) from the
# headers of libdevmapper-dev, found through pkg-config. Quick when they are
# already there (one dpkg query per package).
set -euo pipefail
APT_LIB_NAME=build-deps
# shellcheck source=tests/tools/apt-lib.sh
source "$(dirname "$0")/apt-lib.sh"
install_packages libdevmapper-dev libclang-dev pkg-config
