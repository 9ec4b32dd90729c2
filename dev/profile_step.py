#!/usr/bin/env python3
"""profile_step.py — where one GPU training or decoding step's time goes, kernel by kernel.

Runs ./train (or, with --decode, bench/decode_bench) under Nsight Compute (ncu, kernel
durations only, clocks left alone), cuts the kernel stream into steps at the step's last
kernel (AdamW; decoding: decode_advance_kernel), and prints kernels per step, the GPU time
they add up to, and a table of the kernels that take the most time. ncu runs each kernel
alone and, unless --warm, with cold caches, so the sum is an upper bound; compare it with
the step's wall time (tokens/s) to see how launch-bound a shape is.

    python3 dev/profile_step.py --preset mini --batch-size 8 --seq-len 256 [--vocab-size 1024] [--flags "--mtp"]
    python3 dev/profile_step.py --decode CKPT --batch-size 1 --seq-len 128 --skip 1500 --count 700

Needs a GPU, ncu on PATH, and a built ./train and data/default (or bench/decode_bench and a
checkpoint: decoding runs without the CUDA graph, so that ncu sees each kernel).
"""
import argparse
import collections
import csv
import io
import re
import subprocess
import sys


def short_name(name):
    name = re.sub(r"\(.*", "", name)  # argument list
    name = re.sub(r"<.*", "", name)   # template arguments
    name = name.replace("void ", "")
    return "cuBLASLt GEMM" if re.search(r"nvjet|xmma|cutlass|cublas", name) else name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256, help="training: tokens a row; decoding: the prompt's length")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--skip", type=int, default=4000, help="kernel launches to skip (warm-up)")
    ap.add_argument("--count", type=int, default=4000, help="kernel launches to time")
    ap.add_argument("--flags", default="", help="more ./train options, e.g. \"--mtp\" or \"--fp8\"")
    ap.add_argument("--decode", metavar="CKPT", help="profile bench/decode_bench on this checkpoint instead of ./train")
    ap.add_argument("--warm", action="store_true", help="leave the caches as the previous kernel left them")
    a = ap.parse_args()
    cmd = ["ncu", "--clock-control", "none", "--metrics", "gpu__time_duration.sum", "--csv", "--print-units", "base",
           "--launch-skip", str(a.skip), "--launch-count", str(a.count)] + (["--cache-control", "none"] if a.warm else [])
    if a.decode:
        cmd += ["./bench/decode_bench", "--model", a.decode, "--batch", str(a.batch_size), "--prompt-len", str(a.seq_len),
                "--new-tokens", "64", "--runs", "1", "--no-graph"]
        last, what = "decode_advance", f"decode {a.decode} batch {a.batch_size} prompt {a.seq_len}"
    else:
        cmd += ["./train", "--preset", a.preset, "--vocab-size", str(a.vocab_size), "--batch-size", str(a.batch_size),
                "--seq-len", str(a.seq_len), "--steps", "200", "--device", "gpu", "--val-every", "0", "--sample-every", "0",
                "--save-every", "0", "--overwrite", "--out", "/tmp/profile_run"] + a.flags.split()
        last, what = "adamw", f"{a.preset} B={a.batch_size} T={a.seq_len} {a.flags}"
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    rows = [r for r in csv.DictReader(io.StringIO(out[out.index('"ID"'):])) if r.get("Metric Name") == "gpu__time_duration.sum"]
    kernels = [(short_name(r["Kernel Name"]), float(r["Metric Value"].replace(",", "")) / 1e3) for r in rows]  # ns -> us
    ends = [i for i, (n, _) in enumerate(kernels) if last in n]
    if len(ends) < 2:
        sys.exit("profile_step: fewer than two whole steps in the window; raise --count")
    steps = [kernels[ends[i] + 1: ends[i + 1] + 1] for i in range(len(ends) - 1)]
    per_step = steps[-1]
    total = sum(t for _, t in per_step)
    print(f"{what}: {len(per_step)} kernels per step, {total / 1e3:.3f} ms of GPU time "
          f"per step ({len(steps)} whole steps seen{', warm caches' if a.warm else ''})")
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for n, t in per_step:
        by_name[n][0] += 1
        by_name[n][1] += t
    print(f"{'kernel':44s} {'calls':>6s} {'us':>9s} {'share':>6s}")
    for n, (calls, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"{n[:44]:44s} {calls:6d} {t:9.1f} {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
