"""One process vs two data-parallel processes (torchrun, gloo) on this machine's CPUs: SFT and PPO on the
embedded SmolLM2-135M-Instruct, the same global batch, alternating the two sides.

    .venv/bin/python benchmarks/distributed.py [--repeats 1] [--out runs/bench-distributed]

A single process uses every core through intra-op threads; two processes get half each (torchrun sets
OMP_NUM_THREADS=1 per process on a 2-core machine) and all-reduce their gradients over gloo. On a 2-core CPU
the comparison shows the cost of data parallelism (communication, duplicated weights and engine), not a
speed-up: the figures that matter are on GPUs (benchmarks/gpu_check.sh). Also checked: both sides end with
the same weights (max |difference| printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:smollm2-135m-instruct"
WORK = {
    "sft": ["sft", "--model", MODEL, "--data", "builtin:demos", "--set", "train.max_steps=6", "--set", "train.batch_size=8",
            "--set", "data.max_length=256", "--set", "train.save_every=0", "--set", "train.report_to=none"],
    "ppo": ["ppo", "--model", MODEL, "--set", "reward.gold_weight=1", "--set", "train.max_steps=3", "--set", "model.lora_r=16",
            "--set", "rollout.prompts_per_step=8", "--set", "rollout.max_new_tokens=48", "--set", "ppo.minibatch_size=4",
            "--set", "eval_prompts=0", "--set", "train.save_every=0", "--set", "train.report_to=none"],
}


def run(kind: str, nproc: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "tether"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "tether"]
    t0 = time.time()
    proc = subprocess.run(base + WORK[kind] + ["--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{kind} on {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s = json.loads((out / "summary.json").read_text())
    if kind == "sft":
        tps = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][1:]  # steady state: steps 2..N
        figure = statistics.median(tps)
    else:
        its = [sum(r[k] for k in r if k.startswith("time/")) for r in rows if "time/generate" in r][1:]
        figure = statistics.median(its)
    return {"figure": figure, "wall_s": wall, "peak_rss_mb_rank0": s["peak_memory_mb"]}


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    return max((x[k] - y[k]).abs().max().item() for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-distributed")
    args = ap.parse_args()
    out = ROOT / args.out
    results = {}
    for kind in ("sft", "ppo"):
        for rep in range(args.repeats):
            for nproc in (1, 2) if rep % 2 == 0 else (2, 1):  # alternate which side goes first
                r = run(kind, nproc, out / f"{kind}-{nproc}")
                results.setdefault((kind, nproc), []).append(r)
                print(f"{kind} x{nproc} #{rep}: {r}", file=sys.stderr, flush=True)
        results[(kind, "diff")] = max_difference(out / f"{kind}-1", out / f"{kind}-2")
    unit = {"sft": "tokens/s (steps 2..6)", "ppo": "s/iteration (iterations 2..3)"}
    print("| work | 1 process (2 threads) | 2 processes (1 thread each, gloo) | ratio | wall 1 / 2 | peak RSS rank 0, 1 / 2 | max |param diff| |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("sft", "ppo"):
        one, two = ([statistics.median(x[k] for x in results[(kind, n)]) for k in ("figure", "wall_s", "peak_rss_mb_rank0")] for n in (1, 2))
        print(f"| {kind} {unit[kind]} | {one[0]:.1f} | {two[0]:.1f} | {two[0] / one[0]:.2f}x | {one[1]:.0f} s / {two[1]:.0f} s "
              f"| {one[2] / 1024:.2f} / {two[2] / 1024:.2f} GB | {results[(kind, 'diff')]:.2e} |")
    (out / "results.json").write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
