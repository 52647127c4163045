#!/bin/bash
# Two-batch overlap: output tokens/s of `moe router --overlap on` over `--overlap off`, a router
# and 2 expert nodes (each half of every MoE layer's experts, no replicas) on loopback, the bench
# preset, 32 concurrent greedy requests (prompts of 32 tokens, 64 output tokens, ignore_eos), on
# and off alternating in one run (the order flips every round), in two settings:
#   pinned:  the router on core 0, both nodes on core 1 (taskset), one compute thread each;
#   delayed: every router-node connection through `moe delay-proxy` (+1 ms each way), unpinned.
# usage: bench/overlap.sh [BIN]   (from the repository root; without BIN it builds
#        target/release/moe). MODEL=DIR reuses a generated bench preset (default: generated once
#        into target/moe-bench-model-overlap). ROUNDS (3), CONC (32), LEN (64), PROMPT (32),
#        DELAY_US (1000),
#        SETTINGS ("pinned delayed"). Ports 18801-18830 on loopback.
set -u
BIN=${1:-}
if [ -z "$BIN" ]; then
  nice -n 5 cargo build --release --offline -p moe || exit 1
  BIN=target/release/moe
fi
MODEL=${MODEL:-target/moe-bench-model-overlap}
ROUNDS=${ROUNDS:-3}; CONC=${CONC:-32}; LEN=${LEN:-64}; PROMPT=${PROMPT:-32}; DELAY_US=${DELAY_US:-1000}
SETTINGS=${SETTINGS:-"pinned delayed"}
OUT=${OUT:-/tmp/moe-overlap}; mkdir -p "$OUT"; rm -f "$OUT"/*.json
[ -f "$MODEL/config.json" ] || "$BIN" gen-model --preset bench --out "$MODEL" >/dev/null || exit 1
# MoE layers and expert count from the config: node 0 hosts experts 0..n/2-1, node 1 the rest.
read -r LAYERS HALF LAST <<<"$(python3 - "$MODEL/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
first, last, n = c.get("first_k_dense_replace", 0), c["num_hidden_layers"] - 1, c["n_routed_experts"]
print(f"{first}-{last}", n // 2, n - 1)
PY
)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
wait_ready() { # url log
  for _ in $(seq 1 1200); do curl -sf "$1" >/dev/null && return 0; sleep 0.25; done
  echo "not ready: $1 (see $2)" >&2; exit 1
}
wait_port() { # port
  for _ in $(seq 1 1200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.25; done
  echo "port $1 never opened" >&2; exit 1
}

start_nodes() { # setting
  local pin=() threads=()
  [ "$1" = pinned ] && pin=(taskset -c 1) && threads=(--threads 1)
  "${pin[@]}" "$BIN" "${threads[@]}" expert-node --model "$MODEL" --experts "$LAYERS:0-$((HALF - 1))" \
    --listen 127.0.0.1:18801 > "$OUT/node0-$1.log" 2>&1 & PIDS+=($!)
  "${pin[@]}" "$BIN" "${threads[@]}" expert-node --model "$MODEL" --experts "$LAYERS:$HALF-$LAST" \
    --listen 127.0.0.1:18802 > "$OUT/node1-$1.log" 2>&1 & PIDS+=($!)
  wait_port 18801; wait_port 18802
  NODES=127.0.0.1:18801,127.0.0.1:18802
  if [ "$1" = delayed ]; then
    for i in 0 1; do
      "$BIN" delay-proxy --listen 127.0.0.1:$((18811 + i)) --to 127.0.0.1:$((18801 + i)) \
        --delay-us "$DELAY_US" > "$OUT/proxy$i.log" 2>&1 & PIDS+=($!)
    done
    wait_port 18811; wait_port 18812
    NODES=127.0.0.1:18811,127.0.0.1:18812
  fi
}

round() { # setting overlap round
  local pin=() threads=()
  [ "$1" = pinned ] && pin=(taskset -c 0) && threads=(--threads 1)
  "${pin[@]}" "$BIN" "${threads[@]}" router --model "$MODEL" --experts-at "$NODES" \
    --listen 127.0.0.1:18820 --overlap "$2" > "$OUT/router-$1-$2-$3.log" 2>&1 &
  local rp=$!
  wait_ready http://127.0.0.1:18820/ready "$OUT/router-$1-$2-$3.log"
  "$BIN" bench --url http://127.0.0.1:18820 --requests "$CONC" --concurrency "$CONC" \
    --prompt-len 32 --output-len 8 >/dev/null 2>&1 # warm-up
  "$BIN" bench --url http://127.0.0.1:18820 --requests $((2 * CONC)) --concurrency "$CONC" \
    --prompt-len "$PROMPT" --output-len "$LEN" --json "$OUT/$1-$2-$3.json" >/dev/null 2>&1
  kill $rp; wait $rp 2>/dev/null
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for s in $SETTINGS; do
  start_nodes "$s"
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then round "$s" on "$r"; round "$s" off "$r"
    else round "$s" off "$r"; round "$s" on "$r"; fi
  done
  cleanup; PIDS=()
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT" "$ROUNDS" "$SETTINGS" <<'PY'
import json, statistics, sys
out, rounds, settings = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def tps(s, o, r):
    d = json.load(open(f"{out}/{s}-{o}-{r}.json"))
    assert d["errors"] == 0, d
    return d["output_tokens_per_s"]
for s in settings:
    ratios = []
    for r in range(1, rounds + 1):
        on, off = tps(s, "on", r), tps(s, "off", r)
        ratios.append(on / off)
        print(f"{s} round {r}: overlap on {on:.1f} tok/s, off {off:.1f} tok/s, ratio {on / off:.2f}")
    print(f"{s}: median ratio {statistics.median(ratios):.2f}")
PY
