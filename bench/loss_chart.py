#!/usr/bin/env python3
"""loss_chart.py — several runs' loss curves in one SVG, from their metrics.csv (./train's
per-step log: step,loss,val_loss,...): the training loss of each as a thin line (a moving
average over --smooth steps) and its validation points as a thicker one. No dependencies.

    python3 bench/loss_chart.py --out chart.svg --title "small, tinyshakespeare" \
        bf16=runs/bf16/metrics.csv fp8=runs/fp8/metrics.csv
"""
import argparse
import csv
import sys

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 440, 60, 150, 40, 45


def read_run(path):
    train, val = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            train.append((step, float(row["loss"])))
            if row.get("val_loss"):
                val.append((step, float(row["val_loss"])))
    return train, val


def smooth(points, width):
    out, total = [], 0.0
    for i, (step, loss) in enumerate(points):
        total += loss
        if i >= width:
            total -= points[i - width][1]
        out.append((step, total / min(i + 1, width)))
    return out


def main():
    ap = argparse.ArgumentParser(description="several runs' loss curves in one SVG")
    ap.add_argument("runs", nargs="+", help="NAME=path/to/metrics.csv")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="loss")
    ap.add_argument("--smooth", type=int, default=50, help="moving-average width of the training loss, in steps")
    a = ap.parse_args()
    series = []
    for spec in a.runs:
        if "=" not in spec:
            sys.exit(f"loss_chart.py: '{spec}' is not NAME=path/to/metrics.csv")
        name, path = spec.split("=", 1)
        train, val = read_run(path)
        series.append((name, smooth(train, a.smooth), val))
    steps = [s for _, t, _ in series for s, _ in t]
    losses = [l for _, t, v in series for _, l in t[a.smooth:] + v] or [l for _, t, _ in series for _, l in t]
    x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    px = lambda s: LEFT + (s - x0) / max(x1 - x0, 1) * (W - LEFT - RIGHT)
    py = lambda l: TOP + (y1 - l) / max(y1 - y0, 1e-9) * (H - TOP - BOTTOM)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>', f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{a.title}</text>']
    for i in range(6):
        l = y0 + (y1 - y0) * i / 5
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(l):.1f}" y2="{py(l):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(l) + 4:.1f}" text-anchor="end">{l:.2f}</text>')
    for i in range(6):
        s = x0 + (x1 - x0) * i / 5
        out.append(f'<text x="{px(s):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{s:.0f}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" text-anchor="middle">step</text>')
    for k, (name, train, val) in enumerate(series):
        c = COLOURS[k % len(COLOURS)]
        pts = " ".join(f"{px(s):.1f},{py(l):.1f}" for s, l in train[a.smooth:] or train)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1" opacity="0.7"/>')
        if val:
            pts = " ".join(f"{px(s):.1f},{py(l):.1f}" for s, l in val)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2.5"/>')
        y = TOP + 20 + 40 * k
        out.append(f'<line x1="{W - RIGHT + 12}" x2="{W - RIGHT + 32}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2.5"/>')
        out.append(f'<text x="{W - RIGHT + 38}" y="{y + 4}">{name} val</text>')
        out.append(f'<line x1="{W - RIGHT + 12}" x2="{W - RIGHT + 32}" y1="{y + 16}" y2="{y + 16}" stroke="{c}" opacity="0.7"/>')
        out.append(f'<text x="{W - RIGHT + 38}" y="{y + 20}">{name} train ({a.smooth}-step avg)</text>')
    out.append("</svg>")
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
