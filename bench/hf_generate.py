#!/usr/bin/env python3
"""hf_generate.py — the peer of bench/decode_bench: transformers'
DeepseekV3ForCausalLM.generate on the same checkpoint (from_pretrained, bf16,
default attention and experts backends, KV cache on), the same batch of random
prompts, greedy, exactly --new-tokens new tokens per sequence (no end-of-text stop).

Measured, each the median over --runs after one warm-up:
  prefill tokens/s   batch * prompt_len / (one forward over the prompts with use_cache)
  time to first token  generate(max_new_tokens=1)
  decode tokens/s    batch * (new_tokens - 1) / (generate(new_tokens) - generate(1))
  KV bytes per token   the bytes of the cache generate returns, over batch * cached tokens

Usage (repository root, device machine):
    python3 bench/hf_generate.py --model DIR --batch 1 --prompt-len 128 --new-tokens 128 --runs 5
Prints one JSON line.
"""
import argparse
import json
import os
import statistics
import time

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def cache_bytes(cache):
    """(bytes, cached tokens) of a transformers cache, across cache layouts."""
    tensors = []
    if hasattr(cache, "layers"):  # transformers >= 4.56: DynamicCache.layers[i].keys/values
        for layer in cache.layers:
            tensors += [layer.keys, layer.values]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    else:  # legacy tuple of (key, value) per layer
        for kv in cache:
            tensors += list(kv)
    tensors = [t for t in tensors if t is not None and t.numel() > 0]
    return sum(t.numel() * t.element_size() for t in tensors), tensors[0].shape[-2]


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    # our config.json writes integral floats such as routed_scaling_factor 1.0 as 1,
    # which transformers' strict config dataclass refuses: cast them first
    with open(os.path.join(args.model, "config.json")) as f:
        d = json.load(f)
    for key in ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "attention_dropout", "initializer_range"):
        if isinstance(d.get(key), int):
            d[key] = float(d[key])
    for rope_key in ("rope_scaling", "rope_parameters"):
        if isinstance(d.get(rope_key), dict):
            d[rope_key] = {k: float(v) if isinstance(v, int) and k not in ("original_max_position_embeddings",) else v
                           for k, v in d[rope_key].items()}
    cfg = DeepseekV3Config.from_dict(d)
    model = DeepseekV3ForCausalLM.from_pretrained(args.model, config=cfg, dtype=torch.bfloat16).to("cuda").eval()
    V = model.config.vocab_size
    gen = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    prefill, ttft, full = [], [], []
    kv = None
    with torch.no_grad():
        for r in range(args.runs + 1):
            g = torch.Generator().manual_seed(1000 + r)
            ids = torch.randint(0, V, (args.batch, args.prompt_len), generator=g).cuda()
            mask = torch.ones_like(ids)
            t_prefill, _ = timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True))
            t_first, _ = timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **gen))
            t_all, out = timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                                     min_new_tokens=args.new_tokens, return_dict_in_generate=True, **gen))
            assert out.sequences.shape == (args.batch, args.prompt_len + args.new_tokens), out.sequences.shape
            if r == 0:
                total, cached = cache_bytes(out.past_key_values)
                kv = total / (args.batch * cached)
                continue
            prefill.append(t_prefill)
            ttft.append(t_first)
            full.append(t_all - t_first)
    decode_s = statistics.median(full)
    print(json.dumps({
        "card": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": args.runs,
        "prefill_tok_s": args.batch * args.prompt_len / statistics.median(prefill),
        "ttft_s": statistics.median(ttft),
        "decode_tok_s": args.batch * (args.new_tokens - 1) / decode_s if args.new_tokens > 1 else 0.0,
        "decode_token_ms": 1e3 * decode_s / max(1, args.new_tokens - 1),
        "kv_bytes_per_token": kv,
    }))


if __name__ == "__main__":
    main()
