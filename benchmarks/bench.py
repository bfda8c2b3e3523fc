"""`make bench`: tether and its peer, Hugging Face TRL, side by side on this machine (issue 13).

    python benchmarks/bench.py                     # every row, 3 repeats (SmolLM2-135M-Instruct)
    python benchmarks/bench.py --quick             # smoke run: a 2-layer random model, 3 steps, a few tokens
    python benchmarks/bench.py --only sft,dpo --repeats 5
    make bench BENCH_ARGS="--repeats 1"

The peers live in their own virtual environments, made by benchmarks/setup_peers.sh (`make bench` runs
it): TRL's current release for SFT, reward model, DPO, KTO and GRPO, TRL 1.9.x for PPO (its
`trl.experimental.ppo`, the last PPO in TRL), with the same torch, transformers, accelerate, datasets
and tokenizers versions as tether's venv. The rollout row's peer is plain transformers `generate`;
the label row has no peer and is compared with tether itself at BASELINE_REV (the code issue 13 measured).

What is measured, per run (each side of each row is its own process, started by this script):
- wall time of the whole process (interpreter start, imports, model loading, data preparation,
  training, saving) and its peak RSS (getrusage of that child alone, via os.wait4; this script
  never imports torch itself, so a child's figure does not start from a large parent's);
- steady-state step time: the mean time of optimizer steps 2..N (PPO, GRPO: iterations), from the
  times at which each step ended as each tool logs it (drive_tether.py, drive_peer.py); step 1 carries
  the warm-up and is left out. Throughput = work per step / step time, where the work is what both
  sides do alike: SFT, the real tokens (prompt + completion, chat template included) of `batch`
  examples, the data set's mean times the batch (both sides draw random batches from the same data);
  reward model and DPO, `batch` pairs; KTO, `batch` examples;
- model-FLOPs utilisation of the training rows: 6 * N * (real tokens of the sequences trained per step)
  / step time / the measured matmul peak of the dtype trained in. N counts every parameter once (the
  tied LM head is a matmul, so it counts); attention's own FLOPs (a few % at these lengths) and
  no-grad passes (KTO's KL sequences) are not counted;
- rollout tokens/s: generated tokens / seconds of one timed call after a warm-up call, and that as a
  share of the matmul-peak bound (peak bf16 FLOP/s / 2N tokens/s). The peer generates exactly the
  budget (`min_new_tokens`); tether does too when its `generate` takes `min_new_tokens`, else its
  tokens are counted up to each row's first EOS (a conservative count: the line shows how many rows
  ran the whole budget);
- label responses/s: responses sampled / the stage's own time (summary.json's wall_time_s, model
  loading excluded), the quickstart's sampling settings;
- the machine's peak: the median GFLOP/s of square bf16 and fp32 matmuls (the best of two sizes),
  at torch's default thread count, which both sides also run with.
The two sides alternate (tether, peer, tether, peer, ...) and the table shows medians over repeats.
A failed or missing side is reported in its row with its error; the other rows go on.
Raw measurements: benchmarks/results/latest.json (and latest.md, the table); logs: benchmarks/results/logs/.

Both sides get the same model folder (fp32 weights, bf16 autocast where tether's `--dtype auto` picks
it, TRL's `bf16=True`), data files, batch, lengths, step count, learning rate and schedule (cosine, no
warm-up), full fine-tuning, torch threads. Where the two tools' defaults differ in the work they do,
both are set alike: no held-out evaluation; no gradient checkpointing (TRL's default is on); DPO and
KTO reference log-probs precomputed before training (tether's default; TRL's `precompute_ref_log_probs`);
RL: the same prompts, group size, budget, temperature 1 without top-k/top-p, KL coefficient (so both
load a reference), rollout batch = the whole iteration, one optimizer step per pass; no sample tables
or held-out generations. What stays each tool's own: tether always writes a final checkpoint with the
optimizer state (TRL here saves the model only), optimizer implementations, padding and batching.
"""


from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
RESULTS = HERE / "results"
TETHER_PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
PEERS = {"trl": HERE / ".venv-trl" / "bin" / "python", "trl19": HERE / ".venv-trl19" / "bin" / "python"}
BASELINE_REV = "e570598"  # main when issue 13 was filed: the label row's "today"

# Settings of every row. Full: the sizes; quick: enough to run every code path once.
FULL = {
    "rollout": dict(prompts=64, new_tokens=64, batch_size=64),
    "label": dict(prompts=32, eval_prompts=8, k=3, new_tokens=64, batch_size=48, temperature=0.8, top_p=0.95),
    "sft": dict(examples=64, batch=8, steps=8, max_length=512, lr=2e-5),
    "rm": dict(examples=64, batch=8, steps=8, max_length=256, lr=1e-5),
    "dpo": dict(examples=64, batch=8, steps=8, max_length=256, lr=1e-6),
    "kto": dict(examples=64, batch=8, steps=8, max_length=256, lr=1e-6),
    "grpo": dict(prompts=64, prompts_per_step=8, group=4, new_tokens=64, batch=8, steps=4, lr=1e-6, kl_coef=0.04),
    "ppo": dict(prompts=64, prompts_per_step=16, new_tokens=48, batch=8, epochs=2, steps=4, lr=1e-6, kl_coef=0.05),
}
QUICK = {
    "rollout": dict(prompts=8, new_tokens=8, batch_size=8),
    "label": dict(prompts=2, eval_prompts=1, k=2, new_tokens=8, batch_size=4, temperature=0.8, top_p=0.95),
    "sft": dict(examples=16, batch=2, steps=3, max_length=128, lr=2e-5),
    "rm": dict(examples=16, batch=2, steps=3, max_length=128, lr=1e-5),
    "dpo": dict(examples=16, batch=2, steps=3, max_length=128, lr=1e-6),
    "kto": dict(examples=16, batch=2, steps=3, max_length=128, lr=1e-6),
    "grpo": dict(prompts=8, prompts_per_step=2, group=2, new_tokens=8, batch=2, steps=3, lr=1e-6, kl_coef=0.04),
    "ppo": dict(prompts=8, prompts_per_step=4, new_tokens=8, batch=2, epochs=1, steps=3, lr=1e-6, kl_coef=0.05),
}
ROWS = ["rollout", "label", "sft", "rm", "dpo", "kto", "grpo", "ppo"]
PEER_OF = {"rollout": "hf", "label": "baseline", "ppo": "trl19"} | {r: "trl" for r in ("sft", "rm", "dpo", "kto", "grpo")}
PEER_NAME = {"hf": "transformers generate", "baseline": f"tether {BASELINE_REV}", "trl": "TRL", "trl19": "TRL 1.9"}
# the targets: (table label, row, metric, comparison, target); metric "share" is tether's own figure
TARGETS = [
    ("rollout tokens/s", "rollout", "figure", ">=", 4.0),
    ("rollout share of matmul-peak bound", "rollout", "share", ">=", 0.25),
    ("label responses/s", "label", "figure", ">=", 3.0),
    ("SFT tokens/s", "sft", "figure", ">=", 1.3),
    ("reward model pairs/s", "rm", "figure", ">=", 1.5),
    ("DPO pairs/s", "dpo", "figure", ">=", 1.6),
    ("KTO examples/s", "kto", "figure", None, None),
    ("GRPO step time", "grpo", "figure", "<=", 0.5),
    ("PPO step time", "ppo", "figure", "<=", 0.4),
    ("PPO peak RSS", "ppo", "rss", "<=", 0.6),
]
UNITS = {"rollout": "tok/s", "label": "resp/s", "sft": "tok/s", "rm": "pairs/s", "dpo": "pairs/s", "kto": "ex/s",
         "grpo": "s/step", "ppo": "s/step"}


# --------------------------------------------------------------------------------------------------
# The machine


def matmul_peak(quick: bool) -> dict:
    """Median GFLOP/s of n x n @ n x n matmuls in bf16 and fp32 (2 n^3 FLOPs each), best of two sizes."""
    import torch

    out = {"threads": torch.get_num_threads()}
    sizes, reps = ((512, 1024), 3) if quick else ((2048, 4096), 5)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        best = 0.0
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b  # warm-up
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
        out[f"{name}_gflops"] = round(best, 1)
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


# --------------------------------------------------------------------------------------------------
# Data: generated once, deterministically, into a temp folder both sides read


def prepare(work: Path, sizes: dict, model_arg: str, quick: bool) -> dict:
    """The model folder, every row's data file, a reward model folder for PPO, token counts and N."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tether.models import load_reward_model, smollm2_folder, smollm2_tokenizer_folder, tiny_config

    hf_logging.disable_progress_bar()
    if model_arg == "tiny":
        model = work / "tiny-model"
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(tiny_config()).save_pretrained(model)
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_folder())
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.save_pretrained(model)
    else:
        model = Path(smollm2_folder() if model_arg == "smollm2" else model_arg)
    tok = AutoTokenizer.from_pretrained(model)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())

    pool = sorted({w.strip(".,;:!?\"'()").lower() for line in open(ROOT / "src/tether/assets/demos.jsonl")
                   for m in json.loads(line)["messages"] for w in m["content"].split()} - {""})
    rng = random.Random(0)
    short = quick  # the quick run's texts are a few words

    def text(lo: int, hi: int) -> str:
        lo, hi = (max(2, lo // 10), max(3, hi // 10)) if short else (lo, hi)
        return " ".join(rng.choice(pool) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    def user(s): return [{"role": "user", "content": s}]
    def assistant(s): return [{"role": "assistant", "content": s}]

    def n_tokens(messages) -> int:
        return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])

    files, lengths = {}, {}

    def write(name: str, rows: list[dict]) -> None:
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("sft", [{"prompt": user("Write about this: " + text(10, 30)), "completion": assistant(text(50, 120))}
                  for _ in range(sizes["sft"]["examples"])])
    write("pairs", [{"prompt": user("Answer this: " + text(8, 24)), "chosen": assistant(text(40, 110)),
                     "rejected": assistant(text(40, 110))} for _ in range(max(sizes["rm"]["examples"], sizes["dpo"]["examples"]))])
    write("kto", [{"prompt": user("Answer this: " + text(8, 24)), "completion": assistant(text(40, 110)), "label": i % 2 == 0}
                  for i in range(sizes["kto"]["examples"])])
    write("prompts", [{"prompt": user("Write a short note about " + text(4, 12).rstrip(".").lower() + ".")}
                      for _ in range(max(sizes["grpo"]["prompts"], sizes["ppo"]["prompts"]))])
    write("rollout", [{"prompt": user(f"Write a long, detailed story about {text(3, 8).rstrip('.').lower()}. Use at least 300 words.")}
                      for _ in range(sizes["rollout"]["prompts"])])
    rows = lambda name: [json.loads(line) for line in files[name].read_text().splitlines()]  # noqa: E731
    lengths["sft"] = statistics.mean(n_tokens(r["prompt"] + r["completion"]) for r in rows("sft"))
    pairs = rows("pairs")
    lengths["pair"] = statistics.mean(n_tokens(r["prompt"] + r["chosen"]) + n_tokens(r["prompt"] + r["rejected"]) for r in pairs)
    lengths["kto"] = statistics.mean(n_tokens(r["prompt"] + r["completion"]) for r in rows("kto"))

    # PPO's reward model, the same folder for both sides: the policy with a fresh seeded scalar head
    # (tether's reward tokenizer, whose pad differs from EOS, is saved with it)
    rm_dir = work / "rm"
    torch.manual_seed(0)
    rm, rm_tok = load_reward_model(str(model))
    rm.save_pretrained(rm_dir)
    rm_tok.save_pretrained(rm_dir)
    return {"model": str(model), "rm": str(rm_dir), "files": {k: str(v) for k, v in files.items()},
            "tokens": {k: round(v, 1) for k, v in lengths.items()}, "params": n_params}


def prepare_all(work: Path, sizes: dict, model_arg: str, quick: bool) -> dict:
    """Everything that needs torch, in a child process: this script's own process stays small, because a
    child's peak RSS as getrusage reports it starts from the size of the process that forked it."""
    import torch

    from tether.models import default_device, resolve_dtype

    return {"peak": matmul_peak(quick), "data": prepare(work, sizes, model_arg, quick), "torch": torch.__version__,
            "bf16": resolve_dtype("auto", default_device()) == torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# The two sides of each row


def tether_command(row: str, s: dict, d: dict, out: Path, result: Path) -> list[str]:
    drive = [TETHER_PY, str(HERE / "drive_tether.py"), str(result)]
    if row == "rollout":
        return drive + ["rollout", _spec(out, dict(s, model=d["model"], prompts=d["files"]["rollout"]))]
    base = ["--model", d["model"], "--out", str(out), "--dtype", "auto"]
    if row == "label":
        return drive + ["cli", "label", *base[:4], "--set", f"task.num_prompts={s['prompts']}",
                        "--set", f"task.num_eval_prompts={s['eval_prompts']}", "--set", f"sample.k={s['k']}",
                        "--set", f"sample.temperature={s['temperature']}", "--set", f"sample.top_p={s['top_p']}",
                        "--set", f"sample.max_new_tokens={s['new_tokens']}", "--set", f"sample.batch_size={s['batch_size']}",
                        "--set", "panel.per_pair=5"]
    train = base + ["--max-steps", str(s["steps"]), "--lr", str(s["lr"]), "--lora-r", "0", "--report-to", "none",
                    "--set", "train.save_every=0", "--set", "train.warmup_steps=0", "--set", "train.schedule=cosine"]
    if row in ("sft", "rm", "dpo", "kto"):
        data = d["files"]["pairs" if row in ("rm", "dpo") else row]
        return drive + ["cli", row, *train, "--data", data, "--batch-size", str(s["batch"]), "--max-length", str(s["max_length"]),
                        "--set", "train.grad_accum=1", "--set", "data.eval_fraction=0"]
    per_step = s["prompts_per_step"] * s.get("group", 1)
    rl = train + ["--prompts", d["files"]["prompts"], "--kl-coef", str(s["kl_coef"]),
                  "--set", f"rollout.prompts_per_step={s['prompts_per_step']}", "--set", f"rollout.max_new_tokens={s['new_tokens']}",
                  "--set", f"rollout.batch_size={per_step}", "--set", "rollout.temperature=1.0",
                  "--set", f"ppo.minibatch_size={s['batch']}", "--set", f"ppo.grad_accum={per_step // s['batch']}",
                  "--set", "eval_prompts=0", "--set", "sample_every=0"]
    if row == "grpo":
        return drive + ["cli", "ppo", *rl, "--algo", "grpo", "--reward-fn", "bench_reward:score",
                        "--set", f"rollout.group_size={s['group']}", "--set", "ppo.epochs=1"]
    return drive + ["cli", "ppo", *rl, "--reward-model", d["rm"], "--set", f"ppo.epochs={s['epochs']}"]


def peer_command(row: str, s: dict, d: dict, out: Path, result: Path, bf16: bool) -> list[str]:
    peer = PEER_OF[row]
    if peer == "baseline":  # the same driver and command, run against BASELINE_REV's src/ (see run_side)
        return tether_command(row, s, d, out, result)
    python = TETHER_PY if peer == "hf" else str(PEERS[peer])
    if peer != "hf" and not Path(python).exists():
        raise RuntimeError(f"the peer's venv is missing ({python}): run `sh benchmarks/setup_peers.sh` (make bench does)")
    spec = dict(s, model=d["model"], out=str(out), bf16=bf16)
    if row == "rollout":
        spec["prompts"] = d["files"]["rollout"]
    else:
        spec["data"] = d["files"]["pairs" if row in ("rm", "dpo") else "prompts" if row in ("grpo", "ppo") else row]
        spec["rm"] = d["rm"]
    if row == "grpo":  # per optimizer step: prompts_per_step x group completions, in micro-batches of `batch`
        spec["grad_accum"] = s["prompts_per_step"] * s["group"] // s["batch"]
    return [python, str(HERE / "drive_peer.py"), str(result), "generate" if row == "rollout" else row, _spec(out, spec)]


def _spec(out: Path, spec: dict) -> str:
    path = out.with_name(out.name + ".spec.json")
    path.write_text(json.dumps(spec))
    return str(path)


def baseline_src(work: Path) -> Path:
    """BASELINE_REV's src/ (read out of git, nothing checked out): the label row's 'today'."""
    dest = work / "baseline"
    if not (dest / "src" / "tether").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE_REV, "src"], capture_output=True)
        if archive.returncode:
            raise RuntimeError(f"git archive {BASELINE_REV} failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


# --------------------------------------------------------------------------------------------------
# Running one side


def run_process(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one child process, its output in `log`."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        killer = threading.Timer(timeout, p.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM: no orphan left training
            p.kill()
            p.wait()
            raise
        finally:
            killer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.time() - t0, usage.ru_maxrss / 1024, p.returncode


def figure(row: str, s: dict, d: dict, res: dict, out: Path) -> dict:
    """The row's figure (and step time / MFU inputs) from one run's result."""
    if row == "rollout":
        return {"figure": res["tokens"] / res["seconds"], "tokens": res["tokens"], "seconds": res["seconds"],
                "rows_at_budget": res["rows_at_budget"], "rows": res["rows"], "forced": res["forced"]}
    if row == "label":
        summary = json.loads((out / "summary.json").read_text())
        n = sum(summary[k]["responses"] for k in ("train", "eval") if k in summary)
        return {"figure": n / summary["wall_time_s"], "responses": n, "stage_s": summary["wall_time_s"]}
    ends = res["step_ends"]
    if len(ends) < 2:
        raise RuntimeError(f"{len(ends)} step(s) logged; a steady-state step time needs 2")
    step_s = (ends[-1] - ends[0]) / (len(ends) - 1)  # steps 2..N
    work = {"sft": s["batch"] * d["tokens"]["sft"], "rm": s["batch"], "dpo": s["batch"], "kto": s["batch"]}
    trained = {"sft": d["tokens"]["sft"], "rm": d["tokens"]["pair"], "dpo": d["tokens"]["pair"], "kto": d["tokens"]["kto"]}
    out_ = {"step_s": step_s, "steps_logged": len(ends), "figure": step_s if row in ("grpo", "ppo") else work[row] / step_s}
    if res.get("response_lengths"):
        out_["response_tokens"] = statistics.mean(res["response_lengths"])
    if row in trained:
        out_["train_tokens_per_step"] = s["batch"] * trained[row]
    return out_


def run_side(row: str, side: str, rep: int, s: dict, d: dict, work: Path, bf16: bool, timeout: float) -> dict:
    name = f"{row}-{side}-{rep}"
    out, result, log = work / "runs" / name, work / "runs" / f"{name}.result.json", RESULTS / "logs" / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "src"))
    rec: dict = {"side": side, "repeat": rep, "log": str(log.relative_to(ROOT))}
    try:
        if side == "tether":
            cmd = tether_command(row, s, d, out, result)
        else:
            cmd = peer_command(row, s, d, out, result, bf16)
            if PEER_OF[row] == "baseline":
                env["PYTHONPATH"] = str(baseline_src(work))
        rec["cmd"] = cmd
        wall, rss, rc = run_process(cmd, log, env, timeout)
        rec |= {"wall_s": round(wall, 2), "rss_mb": round(rss, 1), "rc": rc}
        if rc != 0 or not result.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-12:]
            raise RuntimeError(f"exit code {rc}" + (" (killed after the time limit)" if wall >= timeout else "")
                               + ":\n    " + "\n    ".join(tail))
        res = json.loads(result.read_text())
        rec |= {"threads": res.get("threads")} | figure(row, s, d, res, out)
    except Exception as e:  # a failed side is a row's result, not the end of the benchmark
        rec["error"] = str(e)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # model weights and checkpoints: GBs per run
    return rec


# --------------------------------------------------------------------------------------------------
# Table


def median(runs: list[dict], key: str):
    vals = [r[key] for r in runs if key in r and "error" not in r]
    return statistics.median(vals) if vals else None


def fmt(x, unit: str = "") -> str:
    if x is None:
        return "failed"
    if unit == "%":
        return f"{100 * x:.1f}%"
    if unit == "GB":
        return f"{x / 1024:.2f} GB"
    return (f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}") + (f" {unit}" if unit else "")


def table(rows: dict, peak: dict, d: dict) -> tuple[str, dict]:
    flops = {True: peak["bf16_gflops"] * 1e9, False: peak["fp32_gflops"] * 1e9}
    bound = flops[True] / (2 * d["params"])  # tokens/s at the bf16 matmul peak
    lines = ["| work | tether | peer | ratio | target | met | wall s (tether / peer) | peak RSS (tether / peer) | MFU (tether / peer) |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for label, row, metric, how, target in TARGETS:
        if row not in rows:
            continue
        t, p, bf16 = rows[row]["tether"], rows[row]["peer"], rows[row]["bf16"]
        unit = UNITS[row]
        if metric == "rss":
            tv, pv, unit = median(t, "rss_mb"), median(p, "rss_mb"), "GB"
        elif metric == "share":
            tv, pv, unit = (median(t, "figure") or 0) / bound or None, (median(p, "figure") or 0) / bound or None, "%"
        else:
            tv, pv = median(t, "figure"), median(p, "figure")
        ratio = tv / pv if tv is not None and pv and metric != "share" else None
        value = tv if metric == "share" else ratio
        met = "-" if how is None or value is None else ("yes" if (value >= target if how == ">=" else value <= target) else "no")
        tgt = "-" if how is None else f"{how} {100 * target:.0f}%" if metric == "share" else f"{how} {target}x"

        def mfu(runs):
            m = [6 * d["params"] * r["train_tokens_per_step"] / r["step_s"] / flops[bf16] for r in runs
                 if "train_tokens_per_step" in r and "error" not in r]
            return f"{100 * statistics.median(m):.1f}%" if m else "-"

        walls = f"{fmt(median(t, 'wall_s'))} / {fmt(median(p, 'wall_s'))}"
        rss = f"{fmt(median(t, 'rss_mb'), 'GB')} / {fmt(median(p, 'rss_mb'), 'GB')}"
        lines.append(f"| {label} | {fmt(tv, unit)} | {fmt(pv, unit)} ({PEER_NAME[PEER_OF[row]]}) | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {tgt} | {met} | {walls} | {rss} | {mfu(t)} / {mfu(p)} |")
        summary[label] = {"tether": tv, "peer": pv, "ratio": ratio, "target": tgt, "met": met}
    return "\n".join(lines), summary


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="rows: " + ", ".join(ROWS))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny random model, a few steps and tokens")
    ap.add_argument("--only", default="", help="comma-separated rows (default: all)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per side (default 3; --quick: 1)")
    ap.add_argument("--model", default=None, help="smollm2 (default), tiny (--quick's default) or a Hugging Face folder")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder with the generated data")
    ap.add_argument("--prepare", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_process ends its child first
    rows = [r for r in ROWS if not args.only or r in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    model_arg = args.model or ("tiny" if args.quick else "smollm2")
    timeout = 600 if args.quick else 3600
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    if args.prepare:  # the child that measures the machine and writes the data (see prepare_all)
        Path(args.prepare, "prepared.json").write_text(json.dumps(prepare_all(Path(args.prepare), sizes, model_arg, args.quick)))
        return
    load = float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else 0.0
    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    try:
        subprocess.run([TETHER_PY, __file__, "--prepare", str(work), *(["--quick"] if args.quick else []), "--model", model_arg],
                       check=True, cwd=ROOT)
        prep = json.loads((work / "prepared.json").read_text())
        d, peak, bf16 = prep["data"], prep["peak"], prep["bf16"]
        print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {prep['torch']} with {peak['threads']} threads; "
              f"matmul peak bf16 {peak['bf16_gflops']:.0f} GFLOP/s, fp32 {peak['fp32_gflops']:.0f} GFLOP/s", flush=True)
        print(f"model: {d['model']} (N = {d['params'] / 1e6:.1f}M parameters), dtype {'bf16 autocast' if bf16 else 'fp32'}; "
              f"mean tokens: SFT example {d['tokens']['sft']}, pair (both sides) {d['tokens']['pair']}, KTO example "
              f"{d['tokens']['kto']}; {repeats} repeat(s), data in {work}", flush=True)
        if load > 0.5:
            print(f"warning: load average {load:.1f} before the start: other processes are using the CPUs. Two processes'"
                  " OpenMP threads on the same cores slow each other down many-fold; run on an idle machine.", flush=True)
        for row in rows:
            print(f"  {row:<8} settings: {json.dumps(sizes[row])[1:-1]}", flush=True)
        results = {}
        for row in rows:
            results[row] = {"tether": [], "peer": [], "bf16": bf16, "settings": sizes[row]}
            for rep in range(repeats):
                for side in ("tether", "peer"):
                    rec = run_side(row, side, rep, sizes[row], d, work, bf16, timeout)
                    results[row][side].append(rec)
                    shown = (f"error: {rec['error']}" if "error" in rec else
                             f"{fmt(rec['figure'], UNITS[row])}, wall {rec['wall_s']:.1f} s, peak RSS {fmt(rec['rss_mb'], 'GB')}"
                             + (f", mean response {rec['response_tokens']:.1f} tokens" if "response_tokens" in rec else "")
                             + (f", {rec['rows_at_budget']}/{rec['rows']} rows ran the whole budget"
                                f"{' (forced)' if rec['forced'] else ''}" if "rows_at_budget" in rec else ""))
                    print(f"  {row:<8} {side if side == 'tether' else PEER_NAME[PEER_OF[row]]:<22} {rep + 1}/{repeats}: {shown}",
                          flush=True)
        md, summary = table(results, peak, d)
        print("\n" + md)
        failed = [(row, r) for row, res in results.items() for side in ("tether", "peer") for r in res[side] if "error" in r]
        for row, r in failed:
            print(f"failed: {row} {r['side']} run {r['repeat'] + 1}: {r['error'].splitlines()[0]} (log: {r['log']})")
        bound = peak["bf16_gflops"] * 1e9 / (2 * d["params"])
        print(f"\nratio = tether / peer (throughput: higher is better; step time and RSS: lower is better); steady state = "
              f"mean of steps 2..N; rollout bound {bound:.0f} tokens/s (bf16 matmul peak / 2N); MFU = 6N x trained tokens per "
              "step / step time / matmul peak")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.md").write_text(md + "\n")
        (RESULTS / "latest.json").write_text(json.dumps({
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick, "repeats": repeats, "cpu": cpu_name(),
            "cpus": os.cpu_count(), "torch": prep["torch"], "peak": peak, "rollout_bound_tokens_per_s": bound,
            "data": d, "summary": summary, "rows": results}, indent=1, default=str))
        print(f"raw measurements: {(RESULTS / 'latest.json').relative_to(ROOT)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
