#!/usr/bin/env python3
"""hf_compare.py — checks our model against transformers' DeepseekV3ForCausalLM on
the same weights.

On the CPU, in fp32 (relative errors below 1e-5):
1. For several random configs (q_lora on/off, n_group > 1 with topk_group <
   n_group, norm_topk_prob both ways, YaRN on/off) transformers builds and
   save_pretrained()s a model with randomised weights (norm weights and the routing
   bias too); our reference loads that directory and the logits, the loss and
   every parameter gradient are compared.
2. A checkpoint written by our ./train loads with from_pretrained() and gives the
   same logits as our reference; so does one with the MTP module (./train --mtp), whose
   model.layers.{num_hidden_layers}.* tensors transformers leaves unused.

On the GPU, in bf16 (when torch sees a GPU; otherwise reported as skipped):
3. Gradients. Both bf16 paths are measured against a float64 truth (transformers
   in float64): transformers with fp32 weights under bf16 autocast ("HF-bf16") and
   our CUDA path. Errors: logits, loss, all gradients together, and the worst single
   tensor. Ours passes when each of its errors is at most 4x HF-bf16's, or below
   bf16's machine epsilon 2^-8 (at bf16's resolution, whatever HF's luck on that
   number). Routing is dense (top-k = every expert) here: bf16 rounding flips
   near-tie expert choices, a jump no tolerance bounds, while with every expert
   chosen the step is continuous and every MoE kernel still runs. Our CPU reference
   is measured too, as the fp32 baseline.
4. Training. 20 steps from the same weights on the same batches, sparse routing:
   the per-step losses of our CUDA path and of HF-bf16 agree within 1%; our CPU
   reference and transformers in fp32 within 1e-4. Same AdamW (betas 0.9/0.95, eps
   1e-8, weight decay 0.1 on the matrices and the embedding, none on the norm
   weights), learning rate (linear warmup, cosine to a tenth, as ./train), global
   grad-norm clipping at 1; no balance loss and no expert-bias update (transformers
   has neither), no dropout.

Batches follow ./train's DataLoader: batch s is tokens [s*B*T, (s+1)*B*T] of one
stream, each row's targets are its inputs' next tokens, and every position counts
in the mean cross-entropy.

Run from the repository root on a machine with torch and transformers, after
`make train data/prepare dev/ref_dump`:

    python3 dev/hf_compare.py [--json results.json]

Exit status 1 when any check fails.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

FP32_TOLERANCE = 1e-5       # checks 1-2: fp32 against fp32
BF16_RATIO = 4.0            # check 3: ours at most this times HF-bf16's error...
BF16_EPS = 2.0 ** -8        # ...or below bf16's machine epsilon
CURVE_TOLERANCE = 1e-2      # check 4: our GPU losses against HF-bf16's
FP32_CURVE_TOLERANCE = 1e-4  # check 4: our CPU losses against HF-fp32's

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

# check 3: every expert chosen (8 of 8; groups all kept)
DENSE_VARIANTS = [
    ("dense, q_lora, 2 groups, norm_topk_prob",
     dict(q_lora_rank=24, n_group=2, topk_group=2, norm_topk_prob=True, num_experts_per_tok=8), None),
    ("dense, plain q, YaRN 0.707, no norm_topk_prob",
     dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False, num_experts_per_tok=8), yarn(0.707, 1.0)),
]

# check 4: the first variant on bytes of text, sparse top-3 routing
TRAIN_CONFIG = dict(vocab_size=256, q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True)
TRAIN = dict(steps=20, batch_size=8, seq_len=32, lr=5e-3, warmup=5, weight_decay=0.1, grad_clip=1.0)


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


def build_model(extra, rope, seed, work):
    """A randomised transformers model, saved where our binaries can load it."""
    cfg = make_config(extra, rope)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float()
    randomise(model, seed)
    model_dir = os.path.join(work, f"hf_{seed}")
    model.save_pretrained(model_dir, safe_serialization=True)
    return model, model_dir


def on(model, device, dtype):
    """model on device in dtype, with transformers' plain per-expert loop: the
    grouped-GEMM backends it may pick have no float64"""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model.to(device=device, dtype=dtype)


def rel(a, b):
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def hf_grads(model, I):
    """Parameter gradients under our (per-expert, HF checkpoint) names; splits the
    fused expert tensors some transformers versions use."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().cpu()
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


# ----------------------------------------------------------------------------
# token streams and batches, as ./train's DataLoader reads them

def write_tokens(path, stream):
    """An llm.c token file: 256 int32 header (magic 20240520, version 1, count), uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, len(stream)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(stream.numpy().astype(np.uint16).tobytes())


def batch(stream, step, B, T):
    n = B * T
    window = stream[step * n: (step + 1) * n + 1]
    return window[:-1].view(B, T), window[1:].view(B, T)


def learning_rate(step, steps, lr, warmup, min_fraction=0.1):
    """reference.h's learning_rate with total_steps = steps (as ./train sets it)"""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= steps:
        return lr * min_fraction
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_ours(model_dir, stream, B, T, work, device="cpu", steps=1, hp=None):
    """dev/ref_dump on the stream: first-batch logits, first-step loss and
    gradients, and every step's loss"""
    tokens = os.path.join(work, "tokens.bin")
    result = os.path.join(work, f"ours_{device}.safetensors")
    write_tokens(tokens, stream)
    cmd = ["./dev/ref_dump", "--model", model_dir, "--tokens", tokens, "--batch-size", str(B), "--seq-len", str(T),
           "--steps", str(steps), "--device", device, "--out", result]
    for key, flag in [("lr", "--lr"), ("warmup", "--warmup"), ("weight_decay", "--weight-decay"), ("grad_clip", "--grad-clip")]:
        if hp and key in hp:
            cmd += [flag, str(hp[key])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return load_file(result)


def hf_step(model, ids, targets, autocast):
    """forward and backward of one batch; mean cross-entropy over every position"""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    # in the model's precision, and at least fp32 (HF's own loss upcasts bf16 logits too)
    wide = logits if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(wide.reshape(-1, wide.shape[-1]), targets.reshape(-1))
    loss.backward()
    return logits.detach(), loss.detach()


# ----------------------------------------------------------------------------
# 1-2: the CPU reference against transformers in fp32

def compare_hf_to_ours(label, extra, rope, seed, work):
    model, model_dir = build_model(extra, rope, seed, work)
    cfg = model.config
    B, T = 3, 20
    g = torch.Generator().manual_seed(seed + 1)
    stream = torch.randint(0, cfg.vocab_size, (B * T + 1,), generator=g)
    ids, targets = batch(stream, 0, B, T)
    logits, loss = hf_step(model, ids, targets, autocast=False)
    ours = run_ours(model_dir, stream, B, T, work)

    row = {"variant": label, "logits": rel(ours["logits"], logits),
           "loss": abs(ours["loss"].item() - loss.item()) / abs(loss.item())}
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


def compare_ours_to_hf(work, mtp=False):
    """Train a few steps with our binary, then load the checkpoint in transformers. With mtp the
    checkpoint holds the MTP module, which transformers leaves unused: the main model must load and
    match all the same."""
    text = os.path.join(work, "text.txt")
    with open(text, "w") as f:
        f.write(word_text(5, 20000))
    data = os.path.join(work, "data")
    run_dir = os.path.join(work, "run_mtp" if mtp else "run")
    if not os.path.exists(data):
        subprocess.run(["./data/prepare", "--input", text, "--out", data, "--vocab", "256"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["./train", "--preset", "tiny", "--vocab-size", "256", "--steps", "6", "--seq-len", "16", "--batch-size", "4",
                    "--data", data, "--out", run_dir, "--val-every", "0", "--sample-every", "0"]
                   + (["--mtp"] if mtp else []), check=True, stdout=subprocess.DEVNULL)
    ckpt = os.path.join(run_dir, "checkpoint")
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, attn_implementation="eager").float()
    bias = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    g = torch.Generator().manual_seed(6)
    B, T = 2, 16
    stream = torch.randint(0, 256, (B * T + 1,), generator=g)
    ids, targets = batch(stream, 0, B, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    ours = run_ours(ckpt, stream, B, T, work)
    return {"variant": "our ./train checkpoint" + (" with MTP" if mtp else "") + " -> from_pretrained", "logits": rel(ours["logits"], logits),
            "loss": abs(ours["loss"].item() - loss.item()) / abs(loss.item()),
            "routing_bias_loaded": max(b.abs().max().item() for b in bias)}


def word_text(seed, words):
    g = torch.Generator().manual_seed(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "\n"]
    return " ".join(vocab[i] for i in torch.randint(0, len(vocab), (words,), generator=g).tolist())


# ----------------------------------------------------------------------------
# 3: bf16 gradients on the GPU, each side against a float64 truth

def error_row(logits, loss, grads, truth):
    """relative errors of one side against the truth (logits, loss, grads by name)"""
    diff2 = ref2 = 0.0
    worst, worst_name = 0.0, ""
    for name, t in truth["grads"].items():
        a = grads[name].reshape(t.shape).double()
        d2, r2 = (a - t).norm().item() ** 2, t.norm().item() ** 2
        diff2, ref2 = diff2 + d2, ref2 + r2
        e = math.sqrt(d2 / max(r2, 1e-300))
        if e > worst:
            worst, worst_name = e, name
    return {"logits": rel(logits, truth["logits"]), "loss": abs(loss - truth["loss"]) / abs(truth["loss"]),
            "grads": math.sqrt(diff2 / ref2), "worst_tensor": worst, "worst_tensor_name": worst_name}


def compare_gradients_gpu(label, extra, rope, seed, work):
    model, model_dir = build_model(extra, rope, seed, work)
    cfg = model.config
    I = cfg.moe_intermediate_size
    B, T = 4, 32
    g = torch.Generator().manual_seed(seed + 1)
    stream = torch.randint(0, cfg.vocab_size, (B * T + 1,), generator=g)
    ids, targets = (x.cuda() for x in batch(stream, 0, B, T))

    m64 = on(model, "cuda", torch.float64)
    logits, loss = hf_step(m64, ids, targets, autocast=False)
    truth = {"logits": logits.cpu(), "loss": loss.item(), "grads": hf_grads(m64, I)}
    names = sorted(truth["grads"])
    m32 = on(model, "cuda", torch.float32)  # the same module, back to its fp32 weights
    logits, loss = hf_step(m32, ids, targets, autocast=True)
    sides = {"HF-bf16": error_row(logits.float().cpu(), loss.item(), hf_grads(m32, I), truth)}
    for device, side in [("gpu", "ours-gpu"), ("cpu", "ours-cpu")]:
        o = run_ours(model_dir, stream, B, T, work, device=device)
        sides[side] = error_row(o["logits"], o["loss"].item(), {n: o["grad." + n] for n in names}, truth)

    hf, ours = sides["HF-bf16"], sides["ours-gpu"]
    verdicts = {k: ours[k] <= BF16_RATIO * hf[k] or ours[k] < BF16_EPS for k in ("logits", "loss", "grads", "worst_tensor")}
    return {"variant": label, "sides": sides, "pass_by_metric": verdicts, "pass": all(verdicts.values())}


# ----------------------------------------------------------------------------
# 4: 20 training steps, sparse routing

def train_hf(model, stream, B, T, autocast):
    """the loop ./train runs, in PyTorch: AdamW, schedule, clipping, as TRAIN says"""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=TRAIN["lr"], betas=(0.9, 0.95), eps=1e-8, foreach=False)
    losses, lrs = [], []
    for step in range(TRAIN["steps"]):
        ids, targets = (x.cuda() for x in batch(stream, step, B, T))
        lr = learning_rate(step, TRAIN["steps"], TRAIN["lr"], TRAIN["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        _, loss = hf_step(model, ids, targets, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        losses.append(loss.item())
        lrs.append(lr)
    return losses, lrs


CURVE_PAIRS = [("ours-gpu", "HF-bf16"), ("ours-cpu", "HF-fp32"), ("HF-bf16", "HF-fp32"), ("ours-gpu", "HF-fp32")]


def compare_training_gpu(seed, work):
    model, model_dir = build_model(TRAIN_CONFIG, None, seed, work)
    B, T = TRAIN["batch_size"], TRAIN["seq_len"]
    n = TRAIN["steps"] * B * T + 1
    stream = torch.tensor(list(word_text(seed, n).encode()[:n]), dtype=torch.int64)
    fp32_state = {k: v.clone() for k, v in model.state_dict().items()}

    curves = {}
    for side, autocast in [("HF-bf16", True), ("HF-fp32", False)]:
        model.load_state_dict(fp32_state)
        m = on(model, "cuda", torch.float32)
        m.train()
        curves[side], lrs = train_hf(m, stream, B, T, autocast)
    ours_lrs = None
    for device, side in [("gpu", "ours-gpu"), ("cpu", "ours-cpu")]:
        o = run_ours(model_dir, stream, B, T, work, device=device, steps=TRAIN["steps"], hp=TRAIN)
        curves[side] = o["losses"].tolist()
        ours_lrs = o["lrs"].tolist()

    row = {"curves": curves, "schedule_gap": max(abs(x - y) / y for x, y in zip(ours_lrs, lrs))}
    for a, b in CURVE_PAIRS:
        gaps = [abs(x - y) / abs(y) for x, y in zip(curves[a], curves[b])]
        row[f"{a} vs {b}"] = max(gaps)
        row[f"{a} vs {b}, mean"] = sum(gaps) / len(gaps)
    row["pass"] = (row["ours-gpu vs HF-bf16"] < CURVE_TOLERANCE and row["ours-cpu vs HF-fp32"] < FP32_CURVE_TOLERANCE
                   and row["schedule_gap"] < 1e-6 and curves["ours-gpu"][-1] < curves["ours-gpu"][0])
    return row


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name() if gpu else 'no GPU'}")
    # fp32 on the GPU means fp32 (no TF32 matrix products)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    results = {"fp32_tolerance": FP32_TOLERANCE}
    with tempfile.TemporaryDirectory() as work:
        rows = [compare_hf_to_ours(label, extra, rope, 100 + i, work) for i, (label, extra, rope) in enumerate(VARIANTS)]
        rows.append(compare_ours_to_hf(work))
        rows.append(compare_ours_to_hf(work, mtp=True))
        dense = [compare_gradients_gpu(label, extra, rope, 200 + i, work) for i, (label, extra, rope) in enumerate(DENSE_VARIANTS)] if gpu else []
        training = compare_training_gpu(300, work) if gpu else None

    print(f"\n1-2. CPU reference vs transformers, fp32 (tolerance {FP32_TOLERANCE:g})")
    print(f"{'variant':45s} {'logits':>10s} {'loss':>10s} {'grads(max)':>10s}")
    for r in rows:
        grads = r.get("grads")
        print(f"{r['variant']:45s} {r['logits']:10.2e} {r['loss']:10.2e} {'' if grads is None else f'{grads:10.2e}'}")
        errors = [r["logits"], r["loss"]] + ([grads] if grads is not None else [])
        if any(not (e < FP32_TOLERANCE) for e in errors) or r.get("grads_missing_in_hf"):
            ok = False
            print(f"  FAIL: {json.dumps(r)}")
        if "routing_bias_loaded" in r and not r["routing_bias_loaded"] > 0:
            ok = False
            print("  FAIL: the trained routing bias did not reach transformers")
    results["cpu"] = rows

    if not gpu:
        print("\n3-4. GPU checks skipped: torch sees no GPU")
    else:
        print(f"\n3. bf16 gradients on the GPU, dense routing: relative error against transformers in float64")
        print(f"   (ours passes when each error <= {BF16_RATIO:g}x HF-bf16's or < 2^-8 = {BF16_EPS:.2e})")
        for d in dense:
            print(f"   {d['variant']}")
            print(f"   {'side':10s} {'logits':>10s} {'loss':>10s} {'grads':>10s} {'worst':>10s}  worst tensor")
            for side, e in d["sides"].items():
                print(f"   {side:10s} {e['logits']:10.2e} {e['loss']:10.2e} {e['grads']:10.2e} {e['worst_tensor']:10.2e}  "
                      f"{e['worst_tensor_name']}")
            if not d["pass"]:
                ok = False
                print(f"   FAIL: {json.dumps(d['pass_by_metric'])}")
        t = training
        print(f"\n4. {TRAIN['steps']} training steps, sparse routing (B {TRAIN['batch_size']}, T {TRAIN['seq_len']}, "
              f"lr {TRAIN['lr']:g}, warmup {TRAIN['warmup']}, cosine, wd {TRAIN['weight_decay']:g}, clip {TRAIN['grad_clip']:g})")
        print(f"   {'step':>4s} " + " ".join(f"{s:>10s}" for s in t["curves"]))
        for i in range(TRAIN["steps"]):
            print(f"   {i:4d} " + " ".join(f"{c[i]:10.5f}" for c in t["curves"].values()))
        for a, b in CURVE_PAIRS:
            k = f"{a} vs {b}"
            print(f"   relative gap {k:20s}  max {t[k]:.2e}  mean {t[k + ', mean']:.2e}")
        print(f"   (ours-gpu vs HF-bf16 must be < {CURVE_TOLERANCE:g}, ours-cpu vs HF-fp32 < {FP32_CURVE_TOLERANCE:g}; "
              f"learning rates equal within {t['schedule_gap']:.1e})")
        if not t["pass"]:
            ok = False
            print("   FAIL")
        results.update({"gpu": torch.cuda.get_device_name(), "bf16_ratio": BF16_RATIO, "bf16_eps": BF16_EPS,
                        "gradients": dense, "curve_tolerance": CURVE_TOLERANCE,
                        "fp32_curve_tolerance": FP32_CURVE_TOLERANCE, "training": t})
    print("PASS" if ok else "FAIL")
    if args.json:
        results["pass"] = ok
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
