"""SFT training throughput and peak memory of the embedded SmolLM2-135M, fp32 vs bf16 autocast.

    python benchmarks/sft_throughput.py                 # full FT and LoRA, fp32 and bf16, 8x128 tokens
    python benchmarks/sft_throughput.py --steps 5 --seq 256

Each configuration runs in its own process, so peak memory (max RSS, or CUDA max allocated) is its own.
A step is what `tether sft` does: forward under autocast, masked NLL, backward, clip, AdamW step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(dtype_name: str, lora: int, batch: int, seq: int, steps: int) -> dict:
    import torch

    from tether.config import ModelConfig
    from tether.losses.lm import sft_loss, token_logprobs
    from tether.models import autocast, default_device, load_policy, resolve_dtype
    from tether.runloop import peak_memory_mb

    torch.manual_seed(0)
    device = default_device()
    dtype = resolve_dtype(dtype_name, device)
    model, tok = load_policy(ModelConfig(name="builtin:smollm2-135m-instruct", lora_r=lora), device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(100, tok.vocab_size, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    times = []
    for i in range(steps + 1):  # step 0 warms up kernels and allocators
        t0 = time.perf_counter()
        with autocast(device, dtype):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = sft_loss(token_logprobs(logits, ids), mask, int(mask[:, 1:].sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    return {
        "dtype": str(dtype).replace("torch.", ""), "mode": f"lora-r{lora}" if lora else "full",
        "tokens": batch * seq, "step_s": round(step_s, 3), "tokens_per_s": round(batch * seq / step_s, 1),
        "peak_memory_mb": round(peak_memory_mb()), "device": str(device), "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("DTYPE", "LORA_R"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.batch, args.seq, args.steps)))
        return
    rows = []
    for lora in (0, 16):
        for dtype in ("fp32", "bf16"):
            cmd = [sys.executable, __file__, "--one", dtype, str(lora), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                sys.exit(res.stderr)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['mode']:<10} {r['dtype']:<9} {r['tokens']:>5} tok/step  {r['step_s']:>7.2f} s/step  "
                  f"{r['tokens_per_s']:>8.1f} tok/s  peak {r['peak_memory_mb']:>6} MB  ({r['device']}, {r['threads']} threads)",
                  flush=True)


if __name__ == "__main__":
    main()
