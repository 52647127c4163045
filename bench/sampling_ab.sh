#!/bin/bash
# A/B: greedy vs T=1 top_p 0.95 logprobs 5, 32 concurrent requests of 48 tokens, tiny-129k preset.
# usage: bench/sampling_ab.sh SERVER_BIN TAG   (from the repository root, after cargo build -p moe)
# Writes OUT/TAG-{greedy,sampled}-{1,2}.json and prints durations. Port 18712 on loopback.
set -u
BIN=$1; TAG=$2; NEW=${NEW:-target/debug/moe}; OUT=${OUT:-/tmp/moe-sampling-ab}; M=$OUT/tiny129k; PORT=18712
mkdir -p $OUT
[ -f $M/.done ] || { $NEW gen-model --preset tiny-129k --out $M && touch $M/.done; }
$BIN serve --model $M --listen 127.0.0.1:$PORT > $OUT/serve-$TAG.log 2>&1 &
SP=$!
for i in $(seq 1 120); do curl -sf 127.0.0.1:$PORT/ready >/dev/null && break; sleep 0.5; done
for round in 1 2; do
  $NEW bench --url http://127.0.0.1:$PORT --requests 32 --concurrency 32 --prompt-len 32 --output-len 48 --json $OUT/$TAG-greedy-$round.json >/dev/null 2>&1
  $NEW bench --url http://127.0.0.1:$PORT --requests 32 --concurrency 32 --prompt-len 32 --output-len 48 --temperature 1 --top-p 0.95 --logprobs 5 --json $OUT/$TAG-sampled-$round.json >/dev/null 2>&1
done
kill $SP; wait $SP 2>/dev/null
for f in $OUT/$TAG-*.json; do python3 -c "import json,sys;d=json.load(open('$f'));print('$f'.split('/')[-1], 'ok',d['successful'],'err',d['errors'],'dur_s %.2f'%d['duration_s'], 'out_tok_s %.1f'%d.get('output_throughput',0))"; done
