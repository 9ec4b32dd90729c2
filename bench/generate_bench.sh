#!/usr/bin/env bash
# bench/generate_bench.sh — GPU generation (bench/decode_bench, the decoder behind
# ./generate) against transformers' generate (bench/hf_generate.py) on the same
# checkpoint and GPU, in one run: decode tokens/s at batch 1 and 32, prefill
# tokens/s and time to first token for a 1,024-token prompt, KV-cache bytes per
# token; also batch 1 without the CUDA graph. Each number is the median of `runs`
# runs after a warm-up. The checkpoint is the small preset after one training step
# (random weights are fine for speed; every sequence generates all its tokens).
#
#   bash bench/generate_bench.sh [runs [case ...]]   (default 5 runs, every case;
#   cases: b1 b32 p1024 b1_nograph)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.bash
runs=${1:-5}
shift || true
only=" $* "
out=${OUT:-bench/out}
mkdir -p "$out"
for bin in train data/prepare bench/decode_bench; do [ -x "$bin" ] || make -j16 "$bin" >/dev/null; done
[ -f data/default/train.bin ] || ./data/prepare --default --out data/default --vocab 1024 >/dev/null
ckpt=/tmp/generate_bench_small
decode_checkpoint "$ckpt" "$out/generate_bench_train.log"
card_line

# name batch prompt_len new_tokens [--no-graph]
cases=("b1 1 128 128" "b32 32 128 128" "p1024 1 1024 32" "b1_nograph 1 128 128 --no-graph")
selected() { [ "$only" = "  " ] || [[ $only == *" $1 "* ]]; }
for c in "${cases[@]}"; do
    set -- $c
    selected "$1" || continue
    ./bench/decode_bench --model "$ckpt" --batch "$2" --prompt-len "$3" --new-tokens "$4" --runs "$runs" ${5:-} | tee "$out/ours_$1.json"
done
for c in "${cases[@]:0:3}"; do
    set -- $c
    selected "$1" || continue
    PYTHONUNBUFFERED=1 python3 bench/hf_generate.py --model "$ckpt/checkpoint" --batch "$2" --prompt-len "$3" --new-tokens "$4" \
        --runs "$runs" 2>"$out/hf_$1.err" | tee "$out/hf_$1.json" || { echo "hf $1: failed"; tail -3 "$out/hf_$1.err"; }
done

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".json")
    try:
        return json.load(open(p))
    except Exception:
        return None
print("| case | ours decode tok/s | HF decode tok/s | ratio | ours decode GB/s | ours prefill tok/s | HF prefill tok/s | ours TTFT ms "
      "| HF TTFT ms | ours KV B/token | HF KV B/token |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for case in ["b1", "b32", "p1024", "b1_nograph"]:
    o, h = load("ours_" + case), load("hf_" + case)
    if not o:
        continue
    hd = h["decode_tok_s"] if h else float("nan")
    print(f"| {case} (B={o['batch']}, prompt {o['prompt_len']}, {o['new_tokens']} new{'' if o['graph'] else ', no graph'}) "
          f"| {o['decode_tok_s']:,.0f} | {hd:,.0f} | {o['decode_tok_s'] / hd:.1f}x | {o['achieved_gb_s']:,.0f} "
          f"| {o['prefill_tok_s']:,.0f} | {h['prefill_tok_s'] if h else float('nan'):,.0f} "
          f"| {1e3 * o['ttft_s']:.2f} | {1e3 * h['ttft_s'] if h else float('nan'):.2f} "
          f"| {o['kv_bytes_per_token']} | {h['kv_bytes_per_token'] if h else float('nan'):.0f} |")
EOF
