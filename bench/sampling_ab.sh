#!/bin/bash
# A/B: greedy vs T=1 top_p 0.95 logprobs 5, 32 concurrent requests of 48 tokens, on a preset with
# DeepSeek's 129,280-token vocabulary: PRESET=tiny-129k (default; the LM head and sampling are most
# of a step) or PRESET=bench-129k (1B parameters: a step costs what a model's does).
# usage: bench/sampling_ab.sh SERVER_BIN TAG   (from the repository root, after cargo build -p moe)
# Writes OUT/TAG-{greedy,sampled}-N.json (ROUNDS alternating pairs, default 3), prints each
# run's duration and the median ratio of sampled to greedy output throughput. Port 18712.
set -u
BIN=$1; TAG=$2; NEW=${NEW:-target/debug/moe}; OUT=${OUT:-/tmp/moe-sampling-ab}; PRESET=${PRESET:-tiny-129k}; M=$OUT/$PRESET; PORT=18712
mkdir -p $OUT
[ -f $M/.done ] || { $NEW gen-model --preset $PRESET --out $M && touch $M/.done; }
$BIN serve --model $M --listen 127.0.0.1:$PORT > $OUT/serve-$TAG.log 2>&1 &
SP=$!
for i in $(seq 1 120); do curl -sf 127.0.0.1:$PORT/ready >/dev/null && break; sleep 0.5; done
for round in $(seq 1 ${ROUNDS:-3}); do
  $NEW bench --url http://127.0.0.1:$PORT --requests 32 --concurrency 32 --prompt-len 32 --output-len 48 --json $OUT/$TAG-greedy-$round.json >/dev/null 2>&1
  $NEW bench --url http://127.0.0.1:$PORT --requests 32 --concurrency 32 --prompt-len 32 --output-len 48 --temperature 1 --top-p 0.95 --logprobs 5 --json $OUT/$TAG-sampled-$round.json >/dev/null 2>&1
done
kill $SP; wait $SP 2>/dev/null
for f in $OUT/$TAG-*.json; do python3 -c "import json,sys;d=json.load(open('$f'));print('$f'.split('/')[-1], 'ok',d['successful'],'err',d['errors'],'dur_s %.2f'%d['duration_s'], 'out_tok_s %.1f'%d.get('output_tokens_per_s',0))"; done
python3 - "$OUT" "$TAG" <<'PY'
import glob, json, statistics, sys
out, tag = sys.argv[1], sys.argv[2]
dur = lambda kind: [json.load(open(f))['duration_s'] for f in sorted(glob.glob(f"{out}/{tag}-{kind}-*.json"))]
g, s = dur('greedy'), dur('sampled')
ratios = [a / b for a, b in zip(g, s)]
print(f"{tag}: sampled/greedy throughput per pair {['%.2f' % r for r in ratios]}, median {statistics.median(ratios):.2f}")
PY
