#!/usr/bin/env bash
# Every integration test target's file name starts with its tier, and each
# tier of `make test` selects its targets by that prefix (cargo's
# `--test 'PREFIX*'`). A file without one would be built but never run, so it
# fails the run here instead. docs/TESTING.md lists the tiers.
set -euo pipefail
cd "$(dirname "$0")/../.."
TIERS='host_ real_ vm_ k8s_ bench_ kind_'
status=0
for file in crates/*/tests/*.rs tests/*/tests/*.rs; do
    [ -e "$file" ] || continue
    name="$(basename "$file" .rs)"
    ok=0
    for prefix in $TIERS; do
        case "$name" in "$prefix"*) ok=1 ;; esac
    done
    if [ "$ok" -eq 0 ]; then
        printf 'test tiers: %s has no tier prefix (one of: %s); no tier of make test would run it\n' \
            "$file" "$TIERS" >&2
        status=1
    fi
done
exit "$status"
