#!/bin/bash
# Fault handling, before and after (issue 12, point 4): the scenarios of tests/e2e/faults.rs (a
# router over two replicas of every expert of the tiny model, one behind a fault-injecting proxy)
# timed end to end, first with this tree's `moe`, then with another build (BEFORE, e.g. a copy of
# main's target/debug/moe from before the change) through MOE_E2E_BIN. The old build fails the
# tests' assertions (status codes, metrics it does not have): only the timing lines matter here.
#   error   one replica answers layer 2 with an in-band error  -> a 24-token golden request
#   stall   one replica never answers layer 3 (1 s timeout)    -> a 24-token golden request
#   slow    one replica turns 400 ms late after 60 answers      -> the second 24-token request
#   none    no replica of half the experts (static nodes)       -> time to the error, streamed
#           and not (the old build answers a stream 200 and then an in-band error)
# usage: bench/faults.sh [BEFORE_BIN]   (from the repository root)
set -u
BEFORE=${1:-}
run() { # label [env...]
    local label=$1; shift
    echo "== $label"
    env "$@" cargo test -p moe --test faults -- --nocapture --test-threads 1 2>&1 |
        grep -E "^(golden request|one replica|error at|stall at|stream=)|^test .*(ok|FAILED)$" |
        sed 's/^/  /'
}
run "after (this tree)"
[ -n "$BEFORE" ] && run "before ($BEFORE)" MOE_E2E_BIN="$BEFORE"
exit 0
