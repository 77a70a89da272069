# syntax=docker/dockerfile:1
#
# liveclone's images (docs/IMAGE.md). Every build command lives in
# deploy/image/build.sh; the stages only call its subcommands (CI's
# `make image-check` runs the same script on the host and checks that this
# file calls only subcommands that exist).
#
#   docker build -t liveclone .                                      # the driver (default: runtime)
#   docker build --target dm-clone-builder -t liveclone-dm-clone-builder .
#   docker build --target dm-clone-builder --build-arg DM_CLONE_BUILDER_BASE=almalinux:9.6 \
#       -t liveclone-dm-clone-builder-el9 .                         # the same for EL9 nodes
#
# Build arguments: SOURCE_DATE_EPOCH (the commit's time, for reproducible
# output), VERSION and REVISION (labels), LIVECLONE_BUILD_PROFILE (release).

# Pinned by tag. The builder's Debian release is the runtime's, so the
# binary's glibc symbols exist at run time (build.sh check-binary verifies).
ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG DEBIAN_IMAGE=debian:12.12-slim
# The dm-clone builder's base: the node distribution's (see its stage).
ARG DM_CLONE_BUILDER_BASE=${DEBIAN_IMAGE}

# ---------------------------------------------------------------- builder
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The compile packages first, from the script and its two helpers only, so
# that a source change does not re-run apt.
COPY deploy/image/build.sh deploy/image/build.sh
COPY tests/tools/install-build-deps.sh tests/tools/apt-lib.sh tests/tools/
RUN bash deploy/image/build.sh build-deps
# Every workspace member must be here, or cargo cannot load the workspace
# (build.sh check-dockerfile checks this against Cargo.toml).
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests/e2e tests/e2e
# Build arguments are in the environment of the RUN below, where build.sh
# reads them.
ARG SOURCE_DATE_EPOCH=0
ARG LIVECLONE_BUILD_PROFILE=release
# The registry and the target dir are cache mounts: a source change
# recompiles the workspace's crates, not the dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bash deploy/image/build.sh compile /out

# ------------------------------------------------------ dm-clone-builder
# The opt-in kernel module builder (docs/DM-CLONE.md). One stage for every
# distribution it knows: its base is the node distribution's own, because
# the kernel headers and source come from that distribution's package
# manager (the Debian base for Debian 12 nodes; for RHEL 9, Rocky 9 and
# AlmaLinux 9 nodes, --build-arg DM_CLONE_BUILDER_BASE=almalinux:9.6).
# build.sh builder-deps installs with apt or dnf, whichever the base has.
# Runs as root: it installs the node kernel's headers and loads a module.
FROM ${DM_CLONE_BUILDER_BASE} AS dm-clone-builder
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="liveclone-dm-clone-builder" \
      org.opencontainers.image.description="Builds and loads dm-clone.ko on nodes whose distribution kernel lacks it (Debian 12, RHEL 9 and rebuilds)" \
      org.opencontainers.image.source="https://github.com/liveclone/liveclone" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY deploy/image/build.sh /tmp/build.sh
RUN bash /tmp/build.sh builder-deps && rm /tmp/build.sh
COPY deploy/dm-clone/build-dm-clone.sh deploy/dm-clone/build-module.sh /usr/local/lib/liveclone/dm-clone/
RUN ln -s /usr/local/lib/liveclone/dm-clone/build-dm-clone.sh /usr/local/bin/build-dm-clone
USER 0
ENTRYPOINT ["/usr/local/bin/build-dm-clone"]
CMD ["--load"]

# ---------------------------------------------------------------- runtime
# The driver (controller and node plugin) and the node's tools. Last stage,
# so the default target.
FROM ${DEBIAN_IMAGE} AS runtime
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="liveclone" \
      org.opencontainers.image.description="Kubernetes CSI driver for live volume clones with dm-clone" \
      org.opencontainers.image.source="https://github.com/liveclone/liveclone" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# The tools, then the proof that every program the driver runs is there and
# comes from the listed packages (the same check CI runs on the host).
COPY deploy/image/build.sh /tmp/build.sh
RUN bash /tmp/build.sh runtime-deps && bash /tmp/build.sh check-runtime && rm /tmp/build.sh
COPY --from=builder /out/liveclone /usr/local/bin/liveclone
# Non-root by default: the controller needs no privileges. The node
# DaemonSet sets runAsUser 0 and privileged itself (device-mapper, mounts).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/liveclone"]
