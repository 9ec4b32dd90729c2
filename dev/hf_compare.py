#!/usr/bin/env python3
"""hf_compare.py — checks the CPU reference against transformers'
DeepseekV3ForCausalLM on the same weights, both ways:

1. For several random configs (q_lora on/off, n_group > 1 with topk_group <
   n_group, norm_topk_prob both ways, YaRN on/off) transformers builds and
   save_pretrained()s a model with randomised weights (norm weights and the routing
   bias too); our reference loads that directory and the logits, the loss and
   every parameter gradient are compared in fp32.
2. A checkpoint written by our ./train loads with from_pretrained() and gives the
   same logits as our reference.

Run from the repository root on a machine with torch and transformers, after
`make train data/prepare dev/ref_dump`:

    python3 dev/hf_compare.py [--json results.json]

Exit status 1 when any relative error exceeds the tolerance (1e-5).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

TOLERANCE = 1e-5

BASE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=64,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    attention_dropout=0.0,
)


def yarn(mscale, mscale_all_dim):
    return {"rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": mscale, "mscale_all_dim": mscale_all_dim}


VARIANTS = [
    ("q_lora, 4 groups keep 2, norm_topk_prob", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True), None),
    ("plain q_proj, 1 group, no norm_topk_prob", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False), None),
    ("YaRN mscale = mscale_all_dim = 1", dict(q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True), yarn(1.0, 1.0)),
    ("YaRN mscale 0.707, all_dim 1, plain q", dict(q_lora_rank=None, n_group=4, topk_group=2, norm_topk_prob=False), yarn(0.707, 1.0)),
]


def make_config(extra, rope):
    kwargs = dict(BASE, **extra)
    if rope is None:
        return DeepseekV3Config(**kwargs)
    # transformers 5 reads rope_parameters; 4.x reads rope_scaling
    try:
        return DeepseekV3Config(**kwargs, rope_parameters=rope)
    except TypeError:
        return DeepseekV3Config(**kwargs, rope_scaling=rope)


def randomise(model, seed):
    """Weights with O(1) activations, non-unit norm weights and a non-zero routing
    bias: HF's default init (std 0.02, unit norms, zero bias) would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # positive, so HF's 0-masking of dropped groups equals -inf masking
                b.copy_(0.05 * torch.rand(b.shape, generator=g))


def rel(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def hf_grads(model, I):
    """Parameter gradients under our (per-expert, HF checkpoint) names; splits the
    fused expert tensors some transformers versions use."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().float()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(g.shape[0]):
                ge = g[e] if g.shape[1] == 2 * I else g[e].t()
                out[f"{prefix}{e}.gate_proj.weight"] = ge[:I]
                out[f"{prefix}{e}.up_proj.weight"] = ge[I:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(g.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = g[e] if g.shape[2] == I else g[e].t()
        else:
            out[name] = g
    return out


def run_reference(model_dir, ids, targets, work):
    batch = os.path.join(work, "batch.safetensors")
    result = os.path.join(work, "ref.safetensors")
    save_file({"input_ids": ids.float().contiguous(), "targets": targets.float().contiguous()}, batch)
    subprocess.run(["./dev/ref_dump", model_dir, batch, result], check=True, stdout=subprocess.DEVNULL)
    return load_file(result)


def compare_hf_to_ours(label, extra, rope, seed, work):
    cfg = make_config(extra, rope)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float()
    randomise(model, seed)
    model_dir = os.path.join(work, f"hf_{seed}")
    model.save_pretrained(model_dir, safe_serialization=True)

    B, T = 3, 20
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -1)], dim=1)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    ours = run_reference(model_dir, ids, targets, work)

    row = {"variant": label, "logits": rel(ours["logits"], out.logits.detach()),
           "loss": abs(ours["loss"].item() - out.loss.item()) / abs(out.loss.item())}
    theirs = hf_grads(model, cfg.moe_intermediate_size)
    worst, worst_name, missing = 0.0, "", []
    for key in ours:
        if not key.startswith("grad."):
            continue
        name = key[len("grad."):]
        if name not in theirs:
            missing.append(name)
            continue
        e = rel(ours[key], theirs[name].reshape(ours[key].shape))
        if e > worst:
            worst, worst_name = e, name
    row["grads"] = worst
    row["worst_grad"] = worst_name
    row["grads_missing_in_hf"] = missing
    return row


def compare_ours_to_hf(work):
    """Train a few steps with our binary, then load the checkpoint in transformers."""
    text = os.path.join(work, "text.txt")
    g = torch.Generator().manual_seed(5)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "\n"]
    with open(text, "w") as f:
        f.write(" ".join(words[i] for i in torch.randint(0, len(words), (20000,), generator=g).tolist()))
    data = os.path.join(work, "data")
    run_dir = os.path.join(work, "run")
    subprocess.run(["./data/prepare", "--input", text, "--out", data, "--vocab", "256"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["./train", "--preset", "tiny", "--vocab-size", "256", "--steps", "6", "--seq-len", "16", "--batch-size", "4",
                    "--data", data, "--out", run_dir, "--val-every", "0", "--sample-every", "0"], check=True, stdout=subprocess.DEVNULL)
    ckpt = os.path.join(run_dir, "checkpoint")
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, attn_implementation="eager", torch_dtype=torch.float32)
    bias = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -1)], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    ours = run_reference(ckpt, ids, targets, work)
    return {"variant": "our ./train checkpoint -> from_pretrained", "logits": rel(ours["logits"], out.logits),
            "loss": abs(ours["loss"].item() - out.loss.item()) / abs(out.loss.item()),
            "routing_bias_loaded": max(b.abs().max().item() for b in bias)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as work:
        for i, (label, extra, rope) in enumerate(VARIANTS):
            rows.append(compare_hf_to_ours(label, extra, rope, 100 + i, work))
        rows.append(compare_ours_to_hf(work))
    print(f"{'variant':45s} {'logits':>10s} {'loss':>10s} {'grads(max)':>10s}")
    for r in rows:
        grads = r.get("grads")
        print(f"{r['variant']:45s} {r['logits']:10.2e} {r['loss']:10.2e} {'' if grads is None else f'{grads:10.2e}'}")
        errors = [r["logits"], r["loss"]] + ([grads] if grads is not None else [])
        if any(not (e < TOLERANCE) for e in errors) or r.get("grads_missing_in_hf"):
            ok = False
            print(f"  FAIL: {json.dumps(r)}")
        if "routing_bias_loaded" in r and not r["routing_bias_loaded"] > 0:
            ok = False
            print("  FAIL: the trained routing bias did not reach transformers")
    print("PASS" if ok else "FAIL", f"(tolerance {TOLERANCE:g}, fp32)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tolerance": TOLERANCE, "rows": rows, "pass": ok}, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
