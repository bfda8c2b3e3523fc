"""The tether side of one benchmark run, in its own process (bench.py measures its wall time and peak RSS).

    python benchmarks/drive_tether.py RESULT.json cli sft --model DIR --data FILE ...   # the `tether` command's arguments
    python benchmarks/drive_tether.py RESULT.json rollout SPEC.json                     # tether.rollout.generate alone

`cli` runs the tether command in this process and records when each optimizer step (PPO and GRPO:
each iteration) ended, read off tether's own metric log: a trainer calls `Run.log(step, ...)` once at
the end of every step, so the first call for a step is its end. bench.py turns those times into
steady-state step times (the first step, with its warm-up, left out). With PYTHONPATH pointing at
another checkout's src/ the same driver runs that version of tether (the label row's baseline).

`rollout` times tether's sampler on its own: the model is loaded as the stages load it, one short
warm-up call, then one timed call under the stages' autocast. Generated tokens are counted up to
and including each row's first EOS (`Sample.n_tokens`); when `generate` takes `min_new_tokens`
it is passed, so that every row runs the whole budget, as the peer's plain `generate` does.
"""

from __future__ import annotations

import json
import sys
import time


def run_cli(args: list[str]) -> dict:
    from tether import cli, runloop

    ends: dict[int, float] = {}
    lengths: dict[int, float] = {}  # RL: mean sampled response length per iteration, to check the work is alike
    log = runloop.Run.log

    def timed_log(self, step, metrics):
        log(self, step, metrics)
        if step >= 1:
            ends.setdefault(step, time.time())
            if "response/length_mean" in metrics:
                lengths.setdefault(step, float(metrics["response/length_mean"]))

    runloop.Run.log = timed_log
    rc = cli.main(args)
    import torch

    return {"rc": rc, "step_ends": [ends[k] for k in sorted(ends)], "response_lengths": [lengths[k] for k in sorted(lengths)],
            "threads": torch.get_num_threads()}


def run_rollout(spec: dict) -> dict:
    import inspect

    import torch

    from tether.models import autocast, default_device, load_causal_lm, load_tokenizer, resolve_dtype
    from tether.rollout import generate

    device = default_device()
    dtype = resolve_dtype("auto", device)
    tok = load_tokenizer(spec["model"])
    model = load_causal_lm(spec["model"]).to(device)
    with open(spec["prompts"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    forced = "min_new_tokens" in inspect.signature(generate).parameters

    def sample(n: int):
        extra = {"min_new_tokens": n} if forced else {}
        with autocast(device, dtype):
            return generate(model, tok, prompts, n, temperature=1.0, top_p=1.0, batch_size=spec["batch_size"], **extra)

    torch.manual_seed(0)
    sample(4)  # warm-up: kernels, allocator, chat-template rendering
    t0 = time.time()
    out = sample(spec["new_tokens"])
    seconds = time.time() - t0
    return {"rc": 0, "tokens": sum(s.n_tokens for s in out), "seconds": seconds, "rows": len(out),
            "rows_at_budget": sum(s.n_tokens >= spec["new_tokens"] for s in out), "forced": forced,
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}


def main() -> None:
    result_path, mode, *rest = sys.argv[1:]
    if mode == "cli":
        result = run_cli(rest)
    else:
        with open(rest[0]) as f:
            result = run_rollout(json.load(f))
    with open(result_path, "w") as f:
        json.dump(result, f)
    sys.exit(result["rc"])


if __name__ == "__main__":
    main()
