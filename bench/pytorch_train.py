#!/usr/bin/env python3
"""pytorch_train.py — the PyTorch peer of our CUDA trainer: trains transformers'
DeepseekV3ForCausalLM on the same config, batch and sequence length, and reports
training throughput, step time, peak device memory and MFU.

Usage (from the repository root, on the device machine):

    python3 bench/pytorch_train.py --preset mini --mode eager
    python3 bench/pytorch_train.py --preset small --mode compile --json out.json
    python3 bench/pytorch_train.py --config runs/default/checkpoint/config.json \
        --data data/default/train.bin --batch-size 8 --seq-len 256

The loop: fp32 master weights on the GPU, forward and backward under
torch.autocast("cuda", dtype=torch.bfloat16), global grad-norm clip (1.0), AdamW
(lr 3e-3, betas 0.9/0.95, weight decay 0.1 on the matrices and none on the 1-D
norm weights, as our trainer does; fused when available), constant learning rate.
--steps counts every step; the first --warmup-steps (torch.compile's compilation
included) are not timed. Each step is timed with torch.cuda.synchronize() and
time.perf_counter(); tokens/s is the median over the timed steps of
batch*seq_len/step time. Peak memory is torch.cuda.max_memory_allocated() over
the timed steps (reset after warmup), so it holds weights, gradients, optimizer
state and activations of a steady-state step.

Data: random tokens (one fixed batch drawn once and reused every step, so the
loss can fall by memorising it; fresh uniform tokens would leave nothing to
learn) or an llm.c token file (--data: 256 int32 header, magic 20240520 version 1
uint16 tokens or 20240801 version 7 uint32), walked in consecutive batches.
Labels are the inputs (transformers shifts them), so each sequence of seq_len
tokens has seq_len-1 targets; throughput counts the batch*seq_len tokens the
model processes.

Only transformers' public API is used (DeepseekV3Config, DeepseekV3ForCausalLM,
model(input_ids=..., labels=...)) plus, where this transformers has them,
set_experts_implementation / config._attn_implementation to pick backends.

Exit status: 0 on success, 1 on a NaN/inf loss or gradient norm, 3 when the loss
did not fall from the first step to the last (the JSON is still written).
"""
import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

# The presets of config.h, with Hugging Face field names. Keep in sync with
# config_preset() there.
PRESETS = {
    "mini": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
    ),
    "small": dict(
        vocab_size=32768, hidden_size=768, intermediate_size=3072, moe_intermediate_size=768,
        num_hidden_layers=12, num_attention_heads=12, q_lora_rank=384, kv_lora_rank=512,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
    ),
}
COMMON = dict(
    tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0, hidden_act="silu",
    rope_interleave=True, num_nextn_predict_layers=0, initializer_range=0.02, use_cache=False,
)

TOKENS_MAGIC_U16 = 20240520  # version 1
TOKENS_MAGIC_U32 = 20240801  # version 7


def die(msg, code=1):
    print(f"pytorch_train.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------
# config

def build_config(args):
    if args.config:
        with open(args.config) as f:
            d = json.load(f)
        if d.get("tie_word_embeddings"):
            die(f"{args.config}: tie_word_embeddings=true is not supported")
        if d.get("num_nextn_predict_layers", 0):
            die(f"{args.config}: num_nextn_predict_layers > 0 is not supported")
        d["use_cache"] = False
        name = args.config
    else:
        d = dict(PRESETS[args.preset], **COMMON)
        d["num_key_value_heads"] = d["num_attention_heads"]
        name = args.preset
    if args.vocab_size:
        d["vocab_size"] = args.vocab_size
    # from_dict is the path from_pretrained takes (legacy keys such as torch_dtype
    # and rope_scaling are converted there); the presets are plain keyword arguments
    cfg = DeepseekV3Config.from_dict(d) if args.config else DeepseekV3Config(**d)
    cfg._attn_implementation = args.attn
    return cfg, name


def cfg_get(cfg, key, default=None):
    v = getattr(cfg, key, default)
    return default if v is None else v


def dims(cfg):
    """The architecture numbers the FLOP and parameter counts need."""
    q_lora = cfg_get(cfg, "q_lora_rank", 0) or 0
    return dict(
        V=cfg.vocab_size, D=cfg.hidden_size, I=cfg.intermediate_size, Im=cfg.moe_intermediate_size,
        L=cfg.num_hidden_layers, H=cfg.num_attention_heads, qr=q_lora, kvr=cfg.kv_lora_rank,
        dn=cfg.qk_nope_head_dim, dr=cfg.qk_rope_head_dim, dv=cfg.v_head_dim,
        E=cfg_get(cfg, "n_routed_experts", 0), S=cfg_get(cfg, "n_shared_experts", 0),
        K=cfg_get(cfg, "num_experts_per_tok", 0), dense=cfg_get(cfg, "first_k_dense_replace", 0),
    )


def count_params(cfg, T):
    """Analytic parameter counts and training FLOPs per token.

    Matmul weights only count toward FLOPs (norm weights and the routing bias do
    no matmul work; the embedding is a lookup). Per token and layer:
      attention projections: q (q_a D*qr + q_b qr*H*dqk, or q_proj D*H*dqk),
        kv_a D*(kvr+dr), kv_b kvr*H*(dn+dv), o H*dv*D
      dense FFN (first first_k_dense_replace layers): 3*D*I
      MoE layer: router E*D + (top_k + n_shared) * 3*D*Im  (only active experts)
    plus lm_head D*V once. Training FLOPs for a matmul weight: 6 per parameter
    per token (2 forward + 4 backward).

    Attention scores and weighted sum (the part that grows with T), per layer:
      forward, full: Q K^T 2*T*H*dqk + P V 2*T*H*dv FLOPs per token
      causal: half of that, 2*H*T*(dqk+dv)*0.5 = H*T*(dqk+dv)
      training = 3 x forward: 3*H*T*(dqk+dv)
    so attention adds 3*L*H*T*(dqk+dv) = 6*L*H*T*(dqk+dv)*0.5 per token.
    """
    d = dims(cfg)
    V, D, I, Im, L, H = d["V"], d["D"], d["I"], d["Im"], d["L"], d["H"]
    dqk, dv = d["dn"] + d["dr"], d["dv"]
    if d["qr"] > 0:
        q = D * d["qr"] + d["qr"] * H * dqk
        q_norm = d["qr"]
    else:
        q = D * H * dqk
        q_norm = 0
    attn = q + D * (d["kvr"] + d["dr"]) + d["kvr"] * H * (d["dn"] + dv) + H * dv * D
    attn_norms = q_norm + d["kvr"]
    active = D * V  # lm_head
    total = 2 * D * V + D  # embedding, lm_head, final norm
    for layer in range(L):
        active += attn
        total += attn + attn_norms + 2 * D
        moe = d["E"] > 0 and layer >= d["dense"]
        if moe:
            active += d["E"] * D + (d["K"] + d["S"]) * 3 * D * Im
            total += d["E"] * D + (d["E"] + d["S"]) * 3 * D * Im
        else:
            active += 3 * D * I
            total += 3 * D * I
    attn_flops = 3 * L * H * T * (dqk + dv)
    return dict(active_matmul_params=active, total_params=total,
                flops_per_token=6 * active + attn_flops, attn_flops_per_token=attn_flops)


def default_peak_tflops(device_name):
    """Dense bf16 peak of the card (tensor cores, no sparsity)."""
    n = device_name.upper()
    if "H100" in n and "PCIE" in n:
        return 756.0, "H100 PCIe bf16 dense"
    if "H200" in n or "GH200" in n:
        return 989.0, "H200: same compute as H100 SXM, bf16 dense"
    if "H100" in n:
        return 989.0, "H100 SXM bf16 dense"
    if "A100" in n:
        return 312.0, "A100 bf16 dense"
    return 989.0, f"unknown card '{device_name}', assuming H100 SXM bf16 dense"


# ----------------------------------------------------------------------------
# data

def read_token_file(path):
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.size < 256:
        die(f"{path}: shorter than the 1024-byte header")
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic == TOKENS_MAGIC_U16:
        if version != 1:
            die(f"{path}: version {version} does not match magic {magic} (expected 1)")
        dtype = np.uint16
    elif magic == TOKENS_MAGIC_U32:
        if version != 7:
            die(f"{path}: version {version} does not match magic {magic} (expected 7)")
        dtype = np.uint32
    else:
        die(f"{path}: bad magic {magic} (expected {TOKENS_MAGIC_U16} or {TOKENS_MAGIC_U32})")
    expect = 1024 + count * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != expect:
        die(f"{path}: header says {count} tokens ({expect} bytes) but the file has {size} bytes")
    return np.fromfile(path, dtype=dtype, count=count, offset=1024)


class Batches:
    def __init__(self, args, vocab_size):
        self.B, self.T = args.batch_size, args.seq_len
        self.tokens = None
        if args.data:
            self.tokens = read_token_file(args.data)
            if self.tokens.size < self.B * self.T:
                die(f"{args.data}: {self.tokens.size} tokens, fewer than one batch ({self.B}x{self.T})")
            top = int(self.tokens.max())
            if top >= vocab_size:
                die(f"{args.data}: token id {top} >= vocab_size {vocab_size} (use --vocab-size)")
            self.pos = 0
        else:
            g = torch.Generator().manual_seed(args.seed + 1)
            self.fixed = torch.randint(0, vocab_size, (self.B, self.T), generator=g).pin_memory()

    def next(self):
        """The next batch on the host (pinned), as int64 [B, T]."""
        if self.tokens is None:
            return self.fixed
        n = self.B * self.T
        if self.pos + n > self.tokens.size:
            self.pos = 0
        x = torch.from_numpy(self.tokens[self.pos:self.pos + n].astype(np.int64)).view(self.B, self.T)
        self.pos += n
        return x.pin_memory()


# ----------------------------------------------------------------------------
# training

def build(args, cfg, experts):
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(cfg).to("cuda", dtype=torch.float32)
    if experts != "default":
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(experts)
        else:
            die(f"--experts {experts}: this transformers ({transformers.__version__}) has no "
                "set_experts_implementation")
    model.train()
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    kwargs = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    if fused:
        kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **kwargs)
    step_model = torch.compile(model) if args.mode == "compile" else model
    return model, step_model, opt, fused


def train(args, cfg, experts):
    model, step_model, opt, fused = build(args, cfg, experts)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = Batches(args, cfg.vocab_size)
    B, T = args.batch_size, args.seq_len
    losses, times = [], []
    peak = 0
    for step in range(args.steps):
        if step == args.warmup_steps:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        x_host = batches.next()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = x_host.to("cuda", non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_model(input_ids=x, labels=x, use_cache=False)
        loss = out.loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        lv, nv = loss.item(), float(norm)
        if not math.isfinite(lv) or not math.isfinite(nv):
            die(f"step {step}: loss {lv}, grad norm {nv} — not finite")
        losses.append(lv)
        timed = step >= args.warmup_steps
        if timed:
            times.append(dt)
        if not args.quiet:
            print(f"step {step + 1:4d}/{args.steps} | loss {lv:.4f} | norm {nv:.4f} | {dt * 1e3:8.2f} ms | "
                  f"{B * T / dt:10.0f} tok/s{'' if timed else ' (warmup)'}", flush=True)
    peak = torch.cuda.max_memory_allocated()
    impl = getattr(model.config, "_experts_implementation", None)
    attn = getattr(model.config, "_attn_implementation", None)
    n_model = sum(p.numel() for p in model.parameters())
    return dict(losses=losses, times=times, peak=peak, fused=fused, experts_impl=impl, attn_impl=attn,
                model_params=n_model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="model preset of config.h (default mini)")
    src.add_argument("--config", metavar="FILE", help="a config.json (Hugging Face field names)")
    ap.add_argument("--vocab-size", type=int, default=0, help="override vocab_size")
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa", help="attention implementation")
    ap.add_argument("--experts", choices=["default", "eager", "grouped_mm", "batched_mm"], default="default",
                    help="transformers' experts backend (default: whatever this transformers picks; "
                         "falls back to eager, loudly, if that fails on the first step)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--data", metavar="FILE", help="llm.c token file (default: one fixed random batch)")
    ap.add_argument("--steps", type=int, default=30, help="all steps, warmup included (default 30)")
    ap.add_argument("--warmup-steps", type=int, default=5, help="untimed first steps (default 5)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 peak for MFU (default: 989 on H100 SXM and H200)")
    ap.add_argument("--json", metavar="FILE", help="write the results as a JSON object")
    ap.add_argument("--quiet", action="store_true", help="no per-step lines")
    args = ap.parse_args()
    if not args.config and not args.preset:
        args.preset = "mini"
    if args.batch_size < 1 or args.seq_len < 2:
        die("--batch-size must be >= 1 and --seq-len >= 2")
    if args.warmup_steps < 0 or args.steps <= args.warmup_steps:
        die("--steps must exceed --warmup-steps (the timed steps are the rest)")
    if not torch.cuda.is_available():
        die("no CUDA device")

    transformers.logging.set_verbosity_error()
    torch.set_float32_matmul_precision("high")  # TF32 for whatever fp32 matmuls remain

    cfg, name = build_config(args)
    if args.seq_len > cfg.max_position_embeddings:
        die(f"--seq-len {args.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    device_name = torch.cuda.get_device_name()
    if args.peak_tflops > 0:
        peak_tflops, peak_src = args.peak_tflops, "--peak-tflops"
    else:
        peak_tflops, peak_src = default_peak_tflops(device_name)
    counts = count_params(cfg, args.seq_len)

    print(f"pytorch_train: {name} | {args.mode} | attn {args.attn} | batch {args.batch_size} x seq "
          f"{args.seq_len} | {args.steps} steps ({args.warmup_steps} warmup) | {device_name} | torch "
          f"{torch.__version__} | transformers {transformers.__version__}", flush=True)

    experts_used = args.experts
    try:
        r = train(args, cfg, args.experts)
    except Exception as e:  # a backend this stack cannot run under autocast/compile
        if args.experts != "default":
            raise
        print(f"WARNING: training with transformers' default experts backend failed: "
              f"{type(e).__name__}: {str(e)[:500]}\nWARNING: retrying with --experts eager", flush=True)
        if args.mode == "compile":
            torch._dynamo.reset()
        torch.cuda.empty_cache()
        experts_used = "eager"
        r = train(args, cfg, "eager")

    if r["model_params"] != counts["total_params"]:
        print(f"WARNING: the model has {r['model_params']} parameters but the analytic count is "
              f"{counts['total_params']}: the FLOP count may not match this transformers' model", flush=True)

    tps = [args.batch_size * args.seq_len / t for t in r["times"]]
    tps_median = statistics.median(tps)
    step_ms_mean = 1e3 * statistics.mean(r["times"])
    mfu = tps_median * counts["flops_per_token"] / (peak_tflops * 1e12)
    loss_first, loss_last = r["losses"][0], r["losses"][-1]
    print(f"peak {peak_tflops:g} TFLOP/s ({peak_src}); {counts['flops_per_token'] / 1e6:.2f} MFLOP/token "
          f"(active matmul params {counts['active_matmul_params'] / 1e6:.2f}M, attention "
          f"{counts['attn_flops_per_token'] / 1e6:.2f} MFLOP); model params {r['model_params'] / 1e6:.2f}M; "
          f"experts backend {r['experts_impl']}; attention {r['attn_impl']}; fused AdamW {r['fused']}")
    print(f"RESULT pytorch {args.mode} {name}: {tps_median:.0f} tok/s (median of {len(tps)}), "
          f"{step_ms_mean:.2f} ms/step mean, peak mem {r['peak'] / 2**20:.1f} MiB, MFU {100 * mfu:.2f}%, "
          f"loss {loss_first:.4f} -> {loss_last:.4f}", flush=True)

    result = {
        "mode": args.mode,
        "preset": name,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_sec_median": tps_median,
        "step_ms_mean": step_ms_mean,
        "peak_mem_bytes": r["peak"],
        "mfu": mfu,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "device_name": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # context for reading the numbers
        "attn_implementation": r["attn_impl"],
        "experts_implementation": r["experts_impl"],
        "experts_requested": experts_used,
        "timed_steps": len(tps),
        "flops_per_token": counts["flops_per_token"],
        "active_matmul_params": counts["active_matmul_params"],
        "model_params": r["model_params"],
        "peak_tflops": peak_tflops,
        "data": args.data or "random (one fixed batch)",
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    if not loss_last < loss_first:
        die(f"the loss did not fall ({loss_first:.4f} -> {loss_last:.4f})", code=3)


if __name__ == "__main__":
    main()
