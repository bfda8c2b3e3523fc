"""Stage 1, supervised fine-tuning: maximise log pi(assistant tokens | conversation so far).

The loop, top to bottom: load model and data (every row validated first), split off held-out rows,
evaluate once before training, then optimizer steps of `grad_accum` micro-batches each, with
NaN guard, gradient clipping, LR schedule, metrics, periodic and on-signal checkpoints; evaluate
again and write OUT/model and OUT/summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from tether import data as D
from tether.config import SFTConfig
from tether.losses.lm import sft_loss, token_logprobs
from tether.models import autocast, default_device, load_policy, resolve_dtype, save_pretrained
from tether.runloop import NanGuard, Run, make_scheduler, seed_everything

log = logging.getLogger("tether")


def load_data(cfg: SFTConfig, tok) -> tuple[list[dict], list[dict]]:
    d = cfg.data
    examples = D.prepare_sft(tok, D.read_rows(d.path), d.max_length, d.overlong)
    if d.eval_path:
        return examples, D.prepare_sft(tok, D.read_rows(d.eval_path), d.max_length, d.overlong)
    return D.split_eval(examples, d.eval_fraction, cfg.train.seed)


def micro_batch(examples: list[dict], k: int, batch_size: int, seed: int) -> list[dict]:
    """The k-th micro-batch of the whole run. Each epoch is a fresh seeded permutation, so the data
    position is a pure function of k: resuming at step s simply continues at k = s * grad_accum."""
    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, i = divmod(k, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [examples[j] for j in order[i * batch_size : (i + 1) * batch_size].tolist()]


def forward_logps(model, batch: dict, device, dtype) -> torch.Tensor:
    kwargs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with autocast(device, dtype):
        logits = model(**kwargs, use_cache=False).logits
    return token_logprobs(logits, kwargs["input_ids"])


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device, dtype, max_batches: int = 0) -> float:
    """Token-weighted mean NLL over the assistant tokens of `examples` (length-sorted batches)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    total, count = 0.0, 0
    for b, i in enumerate(range(0, len(ordered), batch_size)):
        if max_batches and b >= max_batches:
            break
        batch = D.collate(ordered[i : i + batch_size], pad_id)
        logps = forward_logps(model, batch, device, dtype)
        m = batch["loss_mask"][:, 1:].to(device)
        total += -(logps * m).sum().item()
        count += int(m.sum())
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: SFTConfig, on_step=None) -> dict:
    """Run SFT as `cfg` says. `on_step(step, run, model)` is called after each optimizer step (tests use it
    to interrupt a run). Returns the summary (status 'done', or 'interrupted' after a signal)."""
    t = cfg.train
    seed_everything(t.seed)
    device = default_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, tok = load_policy(cfg.model, device)
    train_set, eval_set = load_data(cfg, tok)
    if t.verbose:
        print("example (trained tokens in [[...]]):\n" + D.describe_example(tok, train_set[0]), file=sys.stderr)
    if cfg.data.packing:
        n_before = len(train_set)
        train_set = D.pack(train_set, cfg.data.max_length)
        log.info("packed %d examples into %d rows of <= %d tokens", n_before, len(train_set), cfg.data.max_length)
    pad_id = tok.pad_token_id

    micro_per_epoch = math.ceil(len(train_set) / t.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))

    params = [p for p in model.parameters() if p.requires_grad]
    # weight decay on matrices only: decaying norms and biases hurts and is not what papers do
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    scheduler = make_scheduler(optimizer, t.schedule, t.warmup_steps, total_steps)
    guard = NanGuard(t.max_nan_skips)

    with Run(t.out, cfg, resume=t.resume, report_to=t.report_to) as run:
        step = 0
        if t.resume and run.latest_checkpoint() is not None:
            progress = run.load_checkpoint(model, optimizer, scheduler)
            step, guard.total = progress["step"], progress.get("nan_skipped", 0)
        eval_args = (t.batch_size, pad_id, device, dtype, t.eval_batches)
        log.info("SFT: %d train / %d eval examples, %d steps, dtype %s, device %s, %d trainable params",
                 len(train_set), len(eval_set), total_steps, str(dtype).replace("torch.", ""), device, sum(p.numel() for p in params))
        if step == 0 and eval_set:
            run.log(0, {"eval/loss": evaluate(model, eval_set, *eval_args)})
        model.train()
        bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 15.0)
        status = "done"
        loss = float("nan")
        while step < total_steps:
            t_step = time.time()
            batches = [D.collate(micro_batch(train_set, k, t.batch_size, t.seed), pad_id)
                       for k in range(step * t.grad_accum, (step + 1) * t.grad_accum)]
            # normalise by the target tokens of the whole step, so accumulation == one large batch
            n_targets = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for b in batches:
                micro_loss = sft_loss(forward_logps(model, b, device, dtype), b["loss_mask"].to(device), n_targets)
                if not math.isfinite(micro_loss.item()):
                    loss_sum = float("nan")
                    break
                micro_loss.backward()
                loss_sum += micro_loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
            if guard.ok(loss_sum, grad_norm):
                optimizer.step()
                loss = loss_sum
            else:
                optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1

            n_tokens = sum(int(b["input_ids"].numel()) for b in batches)
            dt = time.time() - t_step
            if step % t.log_every == 0 or step == total_steps:
                run.log(step, {
                    "train/loss": loss_sum, "train/grad_norm": float(grad_norm), "train/lr": lr,
                    "train/epoch": step / steps_per_epoch, "train/tokens_per_s": n_tokens / dt,
                    "train/target_tokens": n_targets, "train/nan_skipped": guard.total,
                })
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{n_tokens / dt:.0f}")
            bar.update(1)
            if t.eval_every and step % t.eval_every == 0 and step < total_steps and eval_set:
                run.log(step, {"eval/loss": evaluate(model, eval_set, *eval_args)})
            if on_step is not None:
                on_step(step, run, model)
            if run.stop_requested or (t.save_every and step % t.save_every == 0 and step < total_steps):
                run.save_checkpoint(step, model, optimizer, scheduler, {"nan_skipped": guard.total}, t.keep_checkpoints)
            if run.stop_requested:
                status = "interrupted"
                break
        bar.close()
        if status == "interrupted":
            print(f"tether: stopped at step {step}/{total_steps}; checkpoint saved. Continue with --resume.", file=sys.stderr)
            return {"status": status, "step": step}

        final_eval = evaluate(model, eval_set, *eval_args) if eval_set else float("nan")
        if eval_set:
            run.log(step, {"eval/loss": final_eval})
        run.save_checkpoint(step, model, optimizer, scheduler, {"nan_skipped": guard.total}, t.keep_checkpoints)
        model_dir = save_pretrained(model, tok, run.out, merge=cfg.model.merge)
        initial = _first_eval(run)
        return run.finish({
            "stage": "sft", "status": "done", "steps": step, "train/loss": loss,
            "eval/loss_initial": initial, "eval/loss": final_eval,
            "nan_skipped": guard.total, "model": str(model_dir),
            "train_examples": len(train_set), "eval_examples": len(eval_set),
        })


def _first_eval(run: Run) -> float:
    path = run.out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if rec.get("step") == 0 and "eval/loss" in rec:
            return rec["eval/loss"]
    return float("nan")
