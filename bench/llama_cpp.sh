#!/bin/bash
# Our engine next to llama.cpp on the same checkpoint, same thread count, alternating runs.
#
# llama.cpp is built from the PyPI sdist of llama-cpp-python (its vendor/llama.cpp; nothing
# else is fetched), and the bench preset is converted to GGUF bf16 with that tree's own
# convert_hf_to_gguf.py. The preset's generated tokenizer has a pre-tokenizer hash the
# converter does not know: a local copy maps it to DeepSeek-V3's (speed does not depend on it).
# Cases (ours: `cargo bench -p moe-model --bench peer`, see model/benches/peer.rs):
#   pp512        prompt of 512 tokens               llama-bench -p 512 -n 0
#   tg_b1_d0     batch-1 decode, 128 tokens          llama-bench -p 0 -n 128
#   tg_b1_d512   the same after a 512-token context  llama-bench -p 0 -n 128 -d 512
#   tg_b1_d3968  the same after 3,968 (up to 4,096)  llama-bench -p 0 -n 128 -d 3968
#   tg_b16/32    16/32 sequences (32-token prompts)  llama-batched-bench -npp 32 -ntg 128 -npl B (S_TG)
# plus the machine's read bandwidth and our bf16 GEMM figure (peer's `limits`) each round, and
# (FRONTENDS=1, the default) batch-1 decode through our front ends after a 512-token prompt, next
# to the engine's tg_b1_d512: `moe generate` (its decode_tok_s) and `moe serve` with
# `moe bench --concurrency 1` (1 / mean time per output token).
# Each round runs every case for both, the order flipping every round; the report is the
# per-round ratio ours/llama.cpp and its median, with the load average of each round.
# usage: bench/llama_cpp.sh   (from the repository root). ROUNDS (3), THREADS (2), REPS (2, per
#        run), CASES (all above), WORK (target/llama-cpp: venv, sdist, build, GGUF, model),
#        LLAMA_CPP_PYTHON (0.3.36), OUT (WORK/results.json).
set -euo pipefail
ROUNDS=${ROUNDS:-3}; THREADS=${THREADS:-2}; REPS=${REPS:-2}; FRONTENDS=${FRONTENDS:-1}
CASES=${CASES:-"pp512 tg_b1_d0 tg_b1_d512 tg_b1_d3968 tg_b16 tg_b32"}
WORK=${WORK:-target/llama-cpp}; VER=${LLAMA_CPP_PYTHON:-0.3.36}
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd); OUT=${OUT:-$WORK/results.json}
say() { echo "[$(date +%T)] $*" >&2; }

# 1. Python: the converter's requirements (torch, transformers, gguf's numpy) and cmake.
venv=$WORK/venv
if ! "$venv/bin/python" -c "import torch, transformers, numpy, sentencepiece" 2>/dev/null \
    || ! [ -x "$venv/bin/cmake" ]; then
  say "installing the converter's Python requirements and cmake into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==2.11.0" \
    "transformers==4.57.6" "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" \
    "protobuf>=4.21.0,<5.0.0" cmake ninja
fi
export PATH=$venv/bin:$PATH

# 2. llama.cpp from the sdist.
src=$WORK/llama_cpp_python-$VER/vendor/llama.cpp
if ! [ -d "$src" ]; then
  say "downloading the llama-cpp-python $VER sdist"
  "$venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VER" -d "$WORK"
  tar -xzf "$WORK/llama_cpp_python-$VER.tar.gz" -C "$WORK"
fi
bin=$src/build/bin
if ! [ -x "$bin/llama-bench" ] || ! [ -x "$bin/llama-batched-bench" ]; then
  say "building llama-bench and llama-batched-bench (CPU, native)"
  cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >"$WORK/cmake.log"
  nice -n 5 cmake --build "$src/build" -j "$(nproc)" --target llama-bench llama-batched-bench \
    >>"$WORK/cmake.log"
fi

# 3. Our engine's bench, and the bench preset (written once).
say "building the engine's bench (release)"
peer=$(cargo bench -p moe-model --bench peer --no-run --offline 2>&1 \
  | sed -n 's/.*Executable benches\/peer.rs (\(.*\))/\1/p')
[ -x "$peer" ] || { echo "could not build the peer bench" >&2; exit 1; }
cargo build --release --offline -p moe >/dev/null 2>&1
moe=target/release/moe
model=$WORK/bench-model
if ! [ -f "$model/.complete" ]; then
  "$moe" gen-model --preset bench --out "$model" >/dev/null
  touch "$model/.complete"
fi

# 4. GGUF bf16 with the tree's converter (a local copy with the tokenizer hash mapped).
gguf=$WORK/bench-bf16.gguf
if ! [ -f "$gguf" ]; then
  conv=$WORK/convert; rm -rf "$conv"; mkdir -p "$conv"
  cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$conv/"
  # The DeepSeek-V3 entry of get_vocab_base_pre matches any hash in this copy.
  sed -i 's/if chkhsh == "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5":/if True:  # bench preset: generated tokenizer, DeepSeek-V3 pre-tokenizer/' \
    "$conv/conversion/base.py"
  grep -q "bench preset: generated tokenizer" "$conv/conversion/base.py" \
    || { echo "the converter's DeepSeek-V3 hash line moved; update this script" >&2; exit 1; }
  say "converting the bench preset to GGUF bf16"
  PYTHONPATH=$conv/gguf-py nice -n 5 "$venv/bin/python" "$conv/convert_hf_to_gguf.py" "$model" \
    --outtype bf16 --outfile "$gguf" >"$WORK/convert.log" 2>&1
fi

# 5. Alternating runs.
llama() { # case -> tok/s
  local c=$1 d b
  case $c in
    pp512) "$bin/llama-bench" -m "$gguf" -t "$THREADS" -p 512 -n 0 -r "$REPS" -o jsonl ;;
    tg_b1_d*) d=${c#tg_b1_d}
      "$bin/llama-bench" -m "$gguf" -t "$THREADS" -p 0 -n 128 -d "$d" -r "$REPS" -o jsonl ;;
    tg_b*) b=${c#tg_b}
      "$bin/llama-batched-bench" -m "$gguf" -t "$THREADS" -c 8192 -b 2048 -ub 512 -npp 32 \
        -ntg 128 -npl "$b" --output-format jsonl ;;
  esac 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        print(r["avg_ts"] if "avg_ts" in r else r["speed_tg"])'
}
ours() { # case -> tok/s
  MOE_BENCH_MODEL=$model RAYON_NUM_THREADS=$THREADS "$peer" "$1" "$REPS" \
    | sed -n 's/^RESULT case=[^ ]* value=\([^ ]*\).*/\1/p'
}
serve_pid=
trap '[ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null; true' EXIT
front() { # generate|serve -> tok/s at batch 1 after a 512-token prompt
  if [ "$1" = generate ]; then
    local ids; ids=$(python3 -c "print(','.join(str((t * 37) % 500 + 4) for t in range(512)))")
    "$moe" --threads "$THREADS" --log info generate --model "$model" --prompt-ids "$ids" \
      --max-tokens 128 --ignore-eos --json 2>&1 >/dev/null \
      | sed -n 's/.*decode_tok_s="\([^"]*\)".*/\1/p'
  else
    "$moe" bench --url http://127.0.0.1:18840 --requests 3 --concurrency 1 --prompt-len 512 \
      --output-len 128 --json "$WORK/serve-bench.json" >/dev/null 2>&1
    python3 -c 'import json,sys; print(1e3 / json.load(open(sys.argv[1]))["tpot"]["mean_ms"])' \
      "$WORK/serve-bench.json"
  fi
}
if [ "$FRONTENDS" = 1 ]; then
  "$moe" --threads "$THREADS" serve --model "$model" --listen 127.0.0.1:18840 \
    >"$WORK/serve.log" 2>&1 & serve_pid=$!
  for _ in $(seq 1 1200); do curl -sf http://127.0.0.1:18840/ready >/dev/null && break; sleep 0.25; done
  curl -sf http://127.0.0.1:18840/ready >/dev/null || { echo "moe serve not ready" >&2; exit 1; }
fi
rows=$WORK/rows.tsv; : >"$rows"; : >"$WORK/front.tsv"
for r in $(seq 1 "$ROUNDS"); do
  load=$(cut -d' ' -f1 /proc/loadavg)
  lim=$(RAYON_NUM_THREADS=$THREADS "$peer" limits 3)
  bw=$(echo "$lim" | sed -n 's/^RESULT case=read_bandwidth value=\([^ ]*\).*/\1/p')
  gemm=$(echo "$lim" | sed -n 's/^RESULT case=bf16_gemm value=\([^ ]*\).*/\1/p')
  for c in $CASES; do
    if [ $((r % 2)) -eq 1 ]; then a=$(ours "$c"); l=$(llama "$c")
    else l=$(llama "$c"); a=$(ours "$c"); fi
    say "round $r (load $load): $c ours $a llama.cpp $l tok/s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$load" "$c" "$a" "$l" "$bw" "$gemm" >>"$rows"
  done
  if [ "$FRONTENDS" = 1 ]; then
    e=$(ours tg_b1_d512); g=$(front generate); s=$(front serve)
    say "round $r: batch-1 decode after 512 tokens: engine $e, moe generate $g, moe serve $s tok/s"
    printf '%s\t%s\t%s\t%s\n' "$r" "$e" "$g" "$s" >>"$WORK/front.tsv"
  fi
done
python3 - "$rows" "$OUT" "$THREADS" "$WORK/front.tsv" <<'PY'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
cases = list(dict.fromkeys(r[2] for r in rows))
out = {"threads": int(sys.argv[3]), "rounds": [], "cases": {}}
print(f"{'case':<12} {'ours tok/s':>12} {'llama.cpp':>12} {'ratios (per round)':<28} median")
for c in cases:
    rs = [r for r in rows if r[2] == c]
    ratio = [float(r[3]) / float(r[4]) for r in rs]
    med = statistics.median(ratio)
    out["cases"][c] = {"ours": [float(r[3]) for r in rs], "llama_cpp": [float(r[4]) for r in rs],
                       "ratios": ratio, "median_ratio": med}
    print(f"{c:<12} {statistics.median(float(r[3]) for r in rs):>12.1f} "
          f"{statistics.median(float(r[4]) for r in rs):>12.1f} "
          f"{', '.join(f'{x:.2f}' for x in ratio):<28} {med:.2f}")
for r in sorted({(r[0], r[1], r[5], r[6]) for r in rows}):
    out["rounds"].append({"round": int(r[0]), "load": float(r[1]),
                          "read_gb_s": float(r[2]), "bf16_gemm_gflop_s": float(r[3])})
    print(f"round {r[0]}: load {r[1]}, read bandwidth {r[2]} GB/s, our bf16 GEMM {r[3]} GFLOP/s")
front = [l.split() for l in open(sys.argv[4]) if l.strip()]
if front:
    g = [float(f[2]) / float(f[1]) for f in front]
    s = [float(f[3]) / float(f[1]) for f in front]
    out["front_ends"] = {"engine": [float(f[1]) for f in front], "generate_over_engine": g,
                         "serve_over_engine": s}
    print("batch-1 decode after 512 tokens, over the engine's: moe generate "
          f"{', '.join(f'{x:.2f}' for x in g)} (median {statistics.median(g):.2f}), moe serve "
          f"{', '.join(f'{x:.2f}' for x in s)} (median {statistics.median(s):.2f})")
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(f"wrote {sys.argv[2]}")
PY
