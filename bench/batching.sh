#!/bin/bash
# Continuous batching at scale: output tokens/s of `moe serve` at 128 concurrent requests over
# the one-at-a-time figure, alternating the two in one run (this machine is shared: read the
# median of the pairs). Greedy, prompts of 32 tokens, 64 output tokens (ignore_eos).
# usage: MODEL=DIR bench/batching.sh SERVER_BIN   (from the repository root; DIR e.g. the bench
#        preset: target/debug/moe gen-model --preset bench --out DIR). Port 18714 on loopback.
set -u
BIN=$1; MODEL=${MODEL:?set MODEL to a model directory}; ROUNDS=${ROUNDS:-3}
OUT=${OUT:-/tmp/moe-batching}; PORT=18714; LEN=${LEN:-64}
mkdir -p "$OUT"; rm -f "$OUT"/c*.json
"$BIN" serve --model "$MODEL" --listen 127.0.0.1:$PORT > "$OUT/serve.log" 2>&1 &
SP=$!
trap 'kill $SP 2>/dev/null' EXIT
for _ in $(seq 1 600); do curl -sf 127.0.0.1:$PORT/ready >/dev/null && break; sleep 0.5; done
run() { # concurrency requests round
  "$BIN" bench --url http://127.0.0.1:$PORT --requests "$2" --concurrency "$1" --prompt-len 32 \
    --output-len "$LEN" --json "$OUT/c$1-$3.json" >/dev/null 2>&1
}
run 8 8 warm
for r in $(seq 1 "$ROUNDS"); do
  run 1 4 "$r"
  run 128 128 "$r"
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def tps(c, r):
    d = json.load(open(f"{out}/c{c}-{r}.json"))
    assert d["errors"] == 0, d
    return d["output_tokens_per_s"]
ratios = []
for r in range(1, rounds + 1):
    one, many = tps(1, r), tps(128, r)
    ratios.append(many / one)
    print(f"round {r}: 1 concurrent {one:.1f} tok/s, 128 concurrent {many:.1f} tok/s, ratio {many / one:.2f}")
print(f"median ratio {statistics.median(ratios):.2f}")
PY
