#!/usr/bin/env bash
# Decode throughput of `moe serve` on the bench preset with every request traced (100% sampling,
# exported over OTLP/gRPC to a local receiver) against the same server with tracing off, measured
# in one run with alternating A/B rounds (the machine is shared and noisy). Both servers stay up
# for the whole run, so model loading is not measured; only one of them is loaded at a time.
#
#   cargo build --release -p moe && bench/tracing_overhead.sh
#
# Needs target/e2e-venv with grpcio and opentelemetry-proto (.ci/run creates it).
# Knobs: ROUNDS (3), REQUESTS (32), CONCURRENCY (16), OUTPUT_LEN (64), PROMPT_LEN (16).
set -euo pipefail
cd "$(dirname "$0")/.."
moe=${MOE:-target/release/moe}
py=${PYTHON:-target/e2e-venv/bin/python}
rounds=${ROUNDS:-3}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

model=${MOE_BENCH_MODEL:-target/moe-bench-model}
[ -f "$model/config.json" ] || "$moe" gen-model --preset bench --out "$model"

# Waits for "listening on ADDR" in file $1 and prints ADDR.
addr_of() {
    for _ in $(seq 600); do
        if a=$(grep -m1 -o 'listening on [0-9.:]*' "$1" 2>/dev/null); then echo "${a#listening on }"; return; fi
        sleep 0.2
    done
    echo "no address in $1" >&2; exit 1
}

"$py" tests/e2e/otlp_sink.py "$work/spans.jsonl" >"$work/sink.out" & pids+=($!)
sink=$(addr_of "$work/sink.out")

env -u OTEL_EXPORTER_OTLP_ENDPOINT "$moe" serve --model "$model" --listen 127.0.0.1:0 \
    >"$work/off.out" 2>"$work/off.err" & pids+=($!)
OTEL_EXPORTER_OTLP_ENDPOINT="http://$sink" OTEL_TRACES_SAMPLER=always_on \
    "$moe" serve --model "$model" --listen 127.0.0.1:0 >"$work/on.out" 2>"$work/on.err" & pids+=($!)
off=$(addr_of "$work/off.out")
on=$(addr_of "$work/on.out")

run() { # $1: label, $2: address, $3: round
    "$moe" bench --url "http://$2" --requests "${REQUESTS:-32}" --concurrency "${CONCURRENCY:-16}" \
        --prompt-len "${PROMPT_LEN:-16}" --output-len "${OUTPUT_LEN:-64}" --seed "$3" \
        --json "$work/$1-$3.json" >/dev/null
    "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['errors']==0, d; print(d['output_tokens_per_s'])" "$work/$1-$3.json"
}

run off "$off" 0 >/dev/null # warm-up, both
run on "$on" 0 >/dev/null
declare -a a b
for r in $(seq 1 "$rounds"); do
    # Alternate which goes first, so a drift in the machine's load favours neither.
    if [ $((r % 2)) -eq 1 ]; then
        a+=("$(run off "$off" "$r")"); b+=("$(run on "$on" "$r")")
    else
        b+=("$(run on "$on" "$r")"); a+=("$(run off "$off" "$r")")
    fi
    echo "round $r: off ${a[-1]} tok/s, traced ${b[-1]} tok/s"
done
spans=$(wc -l <"$work/spans.jsonl")
"$py" - "${a[*]}" "${b[*]}" "$spans" <<'PY'
import statistics, sys
off = [float(x) for x in sys.argv[1].split()]
on = [float(x) for x in sys.argv[2].split()]
print(f"decode tokens/s  off: median {statistics.median(off):.1f} {off}")
print(f"decode tokens/s  traced (100%): median {statistics.median(on):.1f} {on}")
print(f"ratio traced/off (medians): {statistics.median(on) / statistics.median(off):.3f}")
print(f"ratio traced/off (means): {statistics.mean(on) / statistics.mean(off):.3f}")
print("per-round ratios:", " ".join(f"{b / a:.3f}" for a, b in zip(off, on)))
print(f"spans received by the sink: {sys.argv[3]}")
PY
