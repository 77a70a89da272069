#!/usr/bin/env bash
# `make test`: every tier, in the order that fails fastest, with what can run
# early started early, and a table of how long each step took printed at the
# end -- also when a step fails or the run is killed, so that the tail of a CI
# log always says where the time went.
#
#   1. in the background from the start: the VM's kernel bits
#      (tests/vm/prepare.sh: apt, about 250 MiB of Debian packages, the
#      dm-clone build) and the Go test tools (csi-sanity, kube-apiserver,
#      the CSI sidecars, helm: minutes of downloading and compiling on a fresh
#      machine, nothing once cached). Both are mostly waiting for the network
#      at first, which the cargo build below does not need.
#   2. lint (rustfmt, clippy), then ONE build of every test binary with the
#      features of every tier (TEST_FEATURES in the Makefile): each tier below
#      reuses it instead of rebuilding the crates with its own feature set.
#   3. host tests (host_* targets, unit and doc tests), the image check;
#   4. the Kubernetes API tier (k8s_*), once the tools are built;
#   5. the VM tier: real_* in one boot, the power cuts (vm_*), then the LVM
#      benchmark figures -- last, and skipped with a message when the run
#      has less than LIVECLONE_BENCH_MIN_SECONDS left of
#      LIVECLONE_TEST_BUDGET_SECONDS (set by .ci/run), because a benchmark
#      only prints figures and must never cost the tests their verdict.
set -euo pipefail
cd "$(dirname "$0")/../.."

MAKE="${MAKE:-make}"
LOGS=target/test-logs
mkdir -p "$LOGS"
rm -f "$LOGS/make-test.log"
START=$(date +%s)
BUDGET="${LIVECLONE_TEST_BUDGET_SECONDS:-0}"
BENCH_MIN="${LIVECLONE_BENCH_MIN_SECONDS:-600}"

# Everything also goes to one log, so that the summary can count what only
# shows deep inside a step (a VM boot that hung and was tried again).
exec > >(tee -a "$LOGS/make-test.log") 2>&1

STEPS=()
note_step() { STEPS+=("$(printf '%6d s  %-6s %s' "$2" "$3" "$1")"); }
summary() {
    local status=$?
    trap - EXIT INT TERM
    printf '\n== make test: steps (elapsed %d s) ==\n' "$(( $(date +%s) - START ))" >&2
    local line
    for line in "${STEPS[@]}"; do printf '%s\n' "$line" >&2; done
    if [ -n "${CURRENT:-}" ]; then
        printf '%6d s  %-6s %s\n' "$(( $(date +%s) - CURRENT_START ))" "ended" "$CURRENT" >&2
    fi
    printf '          disk: %s free here, target/ takes %s\n' \
        "$(df -h --output=avail . | tail -n 1 | tr -d ' ')" "$(du -sh target 2>/dev/null | cut -f1)" >&2
    local retried
    retried=$(grep -c 'vmtest: .*booting again' "$LOGS/make-test.log" 2>/dev/null || true)
    printf '          VM boots that hung before their first line and were tried again: %s\n' "${retried:-0}" >&2
    for job in PREPARE TOOLS; do
        local pid_var="${job}_PID"
        if [ -n "${!pid_var:-}" ] && kill -0 "${!pid_var}" 2>/dev/null; then
            printf '          still running: %s (log %s)\n' "$job" "$LOGS/${job,,}.log" >&2
            kill "${!pid_var}" 2>/dev/null || true
        fi
    done
    exit "$status"
}
trap summary EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# step NAME COMMAND...: runs one step in the foreground, timed.
step() {
    local name="$1"
    shift
    CURRENT="$name"
    CURRENT_START=$(date +%s)
    printf '\n== %s ==\n' "$name" >&2
    if "$@"; then
        note_step "$name" "$(( $(date +%s) - CURRENT_START ))" ok
        CURRENT=""
    else
        local status=$?
        note_step "$name" "$(( $(date +%s) - CURRENT_START ))" FAILED
        CURRENT=""
        return "$status"
    fi
}

# background NAME COMMAND...: starts a step whose output goes to its log;
# `await NAME` waits for it, times the wait, and shows the log if it failed.
background() {
    local name="$1"
    shift
    local log="$LOGS/${name,,}.log"
    (
        start=$(date +%s)
        if "$@"; then status=0; else status=$?; fi
        echo "$(( $(date +%s) - start ))" > "$log.seconds"
        exit "$status"
    ) > "$log" 2>&1 &
    printf -v "${name}_PID" '%s' "$!"
    printf '== %s: started in the background (log %s) ==\n' "$name" "$log" >&2
}
await() {
    local name="$1" pid_var="${1}_PID"
    local log="$LOGS/${name,,}.log"
    local waited_from
    waited_from=$(date +%s)
    if wait "${!pid_var}"; then
        note_step "$name (background; waited $(( $(date +%s) - waited_from )) s)" \
            "$(cat "$log.seconds" 2>/dev/null || echo 0)" ok
        printf -v "$pid_var" '%s' ""
        tail -n 3 "$log" >&2
    else
        local status=$?
        note_step "$name (background)" "$(cat "$log.seconds" 2>/dev/null || echo 0)" FAILED
        printf -v "$pid_var" '%s' ""
        printf '== %s failed; its log: ==\n' "$name" >&2
        tail -n 60 "$log" >&2
        return "$status"
    fi
}

time_left() {
    if [ "$BUDGET" -le 0 ]; then echo 999999; return; fi
    echo $(( BUDGET - ($(date +%s) - START) ))
}

# Every test target's name says its tier, so that each tier below can pick
# its own with a pattern and a new test cannot fall between them.
step "test names carry their tier" bash tests/tools/check-test-tiers.sh

if [ "${LIVECLONE_TEST_ON_HOST:-}" != 1 ]; then
    background PREPARE bash tests/vm/prepare.sh
fi
background TOOLS "$MAKE" --no-print-directory tools k8s-tools

step "build dependencies (apt)" "$MAKE" --no-print-directory deps
step "lint (rustfmt, clippy)" "$MAKE" --no-print-directory lint
step "build every test binary once" "$MAKE" --no-print-directory test-build
step "host tests" "$MAKE" --no-print-directory test-unit
step "image build steps" "$MAKE" --no-print-directory image-check

await TOOLS
step "Kubernetes API tests (k8s_*)" "$MAKE" --no-print-directory test-k8s

if [ "${LIVECLONE_TEST_ON_HOST:-}" != 1 ]; then
    await PREPARE
fi
step "real-kernel tests in the VM (real_*)" "$MAKE" --no-print-directory test-real
step "power cuts (vm_*)" "$MAKE" --no-print-directory test-power-cuts

left=$(time_left)
if [ "$left" -ge "$BENCH_MIN" ]; then
    step "LVM benchmark figures 1 and 4" "$MAKE" --no-print-directory bench-lvm-ci
else
    printf '\n== LVM benchmark figures: SKIPPED, %d s left of the %d s budget (it needs %d s); run `make bench-lvm-ci` ==\n' \
        "$left" "$BUDGET" "$BENCH_MIN" >&2
    note_step "LVM benchmark figures (skipped: budget)" 0 skip
fi
