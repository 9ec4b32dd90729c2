#!/usr/bin/env python3
"""hf_fp8_compare.py — an FP8 checkpoint of ours (./train --save-dtype fp8, DeepSeek-V3's
released format: F8_E4M3 weights in 128 x 128 blocks with fp32 weight_scale_inv, and
config.json's quantization_config) loads in transformers' DeepseekV3ForCausalLM, which
runs it with its fine-grained FP8 layers (weights as stored, activations quantized per
1 x 128 tile on the fly), and gives our logits and loss on the same batch within FP8's
tolerance. Ours: dev/ref_dump on the GPU, which loads the checkpoint dequantized.

Every width is a multiple of 128 (transformers' FP8 kernels quantize activations in
whole 128-wide tiles). Needs a GPU (transformers' FP8 path runs only there).

Run from the repository root, after `make train data/prepare dev/ref_dump`:

    python3 dev/hf_fp8_compare.py

Exit status 1 when the logits differ by more than 0.1 or the loss by more than 2e-2
(relative): E4M3 costs about 3.5% per GEMM on each side, differently placed.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM, FineGrainedFP8Config

LOGITS_TOLERANCE, LOSS_TOLERANCE = 0.1, 2e-2
CONFIG = {  # our config.json names; every Linear's width a multiple of 128 but kv_a's (576 in DeepSeek-V3 too)
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": 128, "kv_lora_rank": 128,
    "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 4,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "max_position_embeddings": 256,
}


def run(*cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main():
    tmp = tempfile.mkdtemp(prefix="hf_fp8_")
    if not os.path.exists("data/default/val.bin"):
        run("./data/prepare", "--default", "--out", "data/default", "--vocab", "1024")
    with open(f"{tmp}/config.json", "w") as f:
        json.dump(CONFIG, f)
    run("./train", "--config", f"{tmp}/config.json", "--data", "data/default", "--steps", "50", "--batch-size", "8",
        "--seq-len", "128", "--save-dtype", "fp8", "--sample-every", "0", "--val-every", "0", "--out", f"{tmp}/run")
    ckpt = f"{tmp}/run/checkpoint"
    B, T = 2, 128
    run("dev/ref_dump", "--model", ckpt, "--tokens", "data/default/val.bin", "--batch-size", str(B), "--seq-len", str(T),
        "--out", f"{tmp}/ours.safetensors", "--device", "gpu")
    ours = load_file(f"{tmp}/ours.safetensors")["logits"].float().cuda()

    header = 1024  # the llm.c token file: 256 int32 header, then uint16 tokens
    with open("data/default/val.bin", "rb") as f:
        f.seek(header)
        tokens = torch.frombuffer(bytearray(f.read(2 * (B * T + 1))), dtype=torch.uint16).to(torch.long).cuda()
    inputs, targets = tokens[:-1].view(B, T), tokens[1:].view(B, T)
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, device_map="cuda", torch_dtype=torch.bfloat16)
    quantized = sum(1 for m in model.modules() if "FP8" in type(m).__name__)
    try:
        with torch.no_grad():
            theirs = model(inputs).logits.float()
    except ImportError as e:
        # transformers' FP8 matmul comes from the `kernels` package, which fetches it from
        # the Hub at run time; offline, its own dequantizing loader still reads the format
        # (F8_E4M3 blocks times weight_scale_inv) and runs the model in bf16
        print(f"transformers' FP8 kernel is unavailable ({str(e).splitlines()[0][:80]}...); loading with dequantize=True")
        model = DeepseekV3ForCausalLM.from_pretrained(ckpt, device_map="cuda", torch_dtype=torch.bfloat16,
                                                      quantization_config=FineGrainedFP8Config(dequantize=True))
        quantized = 0
        with torch.no_grad():
            theirs = model(inputs).logits.float()
    logits_error = ((theirs - ours).norm() / ours.norm()).item()
    loss_ours = F.cross_entropy(ours.view(-1, ours.shape[-1]), targets.reshape(-1)).item()
    loss_theirs = F.cross_entropy(theirs.view(-1, theirs.shape[-1]), targets.reshape(-1)).item()
    loss_error = abs(loss_theirs - loss_ours) / loss_ours
    print(f"transformers' FP8 modules: {quantized} (0: dequantized on load); logits relative error {logits_error:.3e} (bound {LOGITS_TOLERANCE}); "
          f"loss ours {loss_ours:.6f} transformers {loss_theirs:.6f} ({loss_error:.3e}, bound {LOSS_TOLERANCE})")
    ok = logits_error < LOGITS_TOLERANCE and loss_error < LOSS_TOLERANCE
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
