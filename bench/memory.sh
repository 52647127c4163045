#!/bin/bash
# Settled memory against the placement (issue 11, point 5), on the bench preset (2.0 GB bf16).
#   1. `moe serve` vs `moe up --nodes 4 --replicas 1`: private memory (RssAnon) of the one process
#      once ready, and how many placements bring-up rolled out.
#   2. Separate processes on a real etcd (loopback): a coordinator (--min-replicas 1), three
#      expert nodes, then a fourth joins (a third of every node's experts move to it). After each
#      rollout settles, every node's private memory next to the bytes of the experts it hosts
#      (`moe_node_expert_bytes` on its /metrics) and the ratio.
# usage: bench/memory.sh [MOE_BIN]   (from the repository root; default target/release/moe)
# Needs etcd on PATH (.ci/run installs it). Model: $MODEL, or $OUT/bench (generated once).
set -u
BIN=${1:-target/release/moe}; OUT=${OUT:-/tmp/moe-memory}; M=${MODEL:-$OUT/bench}
mkdir -p "$OUT"
[ -n "${MODEL:-}" ] || [ -f "$M/.done" ] || { "$BIN" gen-model --preset bench --out "$M" >/dev/null && touch "$M/.done"; }
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null' EXIT

anon() { awk '/RssAnon/{print $2 * 1024}' "/proc/$1/status"; }
gib() { python3 -c "print('%.3f' % ($1 / 2**30))"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_line FILE PATTERN [SECONDS]
wait_line() {
    for _ in $(seq 1 $((${3:-600} * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "no '$2' in $1" >&2; exit 1
}
# One value of a metric family from a /metrics URL.
metric() { curl -sf "$1" | awk -v n="$2" '$1 ~ "^"n"({|$)" {print $2; exit}'; }

# 1. One process.
one() { # name args...
    local name=$1; shift
    "$BIN" "$@" --model "$M" --listen 127.0.0.1:0 >"$OUT/$name.log" 2>&1 &
    local pid=$!
    wait_line "$OUT/$name.log" '^ready\|^listening on'
    [ "$name" = up ] && wait_line "$OUT/$name.log" '^ready'
    sleep 2 # the API is up; let the last unloads and trims run
    local a; a=$(anon $pid)
    echo "$a" >"$OUT/$name.anon"
    echo "$name: private $(gib "$a") GiB, rollouts $(grep -c 'rolling out a placement' "$OUT/$name.log")"
    kill -INT $pid; wait $pid 2>/dev/null
}
one serve serve
one up up --nodes 4 --replicas 1
python3 -c "print('moe up / moe serve: %.3f' % ($(cat "$OUT/up.anon") / $(cat "$OUT/serve.anon")))"

# 2. Separate processes on a real etcd.
CP=$(free_port); PP=$(free_port); ETCD=http://127.0.0.1:$CP
rm -rf "$OUT/etcd"
etcd --data-dir "$OUT/etcd" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
    --initial-cluster "default=http://127.0.0.1:$PP" >"$OUT/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -sf "$ETCD/health" >/dev/null && break; sleep 0.1; done
"$BIN" coordinator --etcd "$ETCD" --model "$M" --min-replicas 1 --rebalance-threshold 0 \
    >"$OUT/coord.log" 2>&1 &
PIDS+=($!)
declare -A NPID NMET
node() {
    "$BIN" expert-node --etcd "$ETCD" --model "$M" --node-id "$1" --listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 >"$OUT/$1.log" 2>&1 &
    NPID[$1]=$!; PIDS+=($!)
    wait_line "$OUT/$1.log" '^metrics on' 60
    NMET[$1]="http://$(awk '/^metrics on/{print $3; exit}' "$OUT/$1.log")/metrics"
}
report() { # label nodes...
    local label=$1; shift
    echo "$label"
    for n in "$@"; do
        local a b; a=$(anon "${NPID[$n]}"); b=$(metric "${NMET[$n]}" moe_node_expert_bytes)
        python3 -c "print('  %s: private %.3f GiB, experts %.3f GiB, ratio %.3f, over by %.0f MiB' % ('$n', $a/2**30, $b/2**30, $a/max($b,1), ($a-$b)/2**20))"
    done
}
node n0; node n1; node n2
wait_line "$OUT/coord.log" 'active (3 nodes' 600
sleep 2
report "3 nodes settled" n0 n1 n2
node n3
wait_line "$OUT/coord.log" 'active (4 nodes' 600
sleep 2
report "after a 4th node joined (the others unloaded a quarter)" n0 n1 n2 n3
