"""Stage 1, supervised fine-tuning: maximise log pi(assistant tokens | conversation so far).

The loop, top to bottom: load model and data (every row validated first), split off held-out rows,
evaluate once before training, then optimizer steps of `grad_accum` micro-batches each, with
NaN guard, gradient clipping, LR schedule, metrics, periodic and on-signal checkpoints; evaluate
again and write OUT/model and OUT/summary.json.
"""

from __future__ import annotations

import logging
import sys

import torch

from tether import data as D
from tether.config import SFTConfig
from tether.errors import TetherError
from tether.losses.lm import sft_loss
from tether.models import autocast, default_device, load_policy, resolve_dtype
from tether.rollout import scored_logprobs
from tether.distributed import world
from tether.runloop import Run, fit, save_model, micro_batch, seed_everything, training_setup

log = logging.getLogger("tether")


def load_data(cfg: SFTConfig, tok) -> tuple[list[dict], list[dict]]:
    d = cfg.data
    if d.min_agreement:
        raise TetherError("data.min_agreement filters preference pairs; SFT data has no annotator votes")
    examples = D.prepare_sft(tok, D.read_rows(d.path), d.max_length, d.overlong)
    if d.eval_path:
        return examples, D.prepare_sft(tok, D.read_rows(d.eval_path), d.max_length, d.overlong)
    return D.split_eval(examples, d.eval_fraction, cfg.train.seed)


def forward_logps(model, batch: dict, device, dtype) -> torch.Tensor:
    """Per-token log-probs (B, T-1) of the trained tokens (0 elsewhere): the LM head runs on those alone."""
    kwargs = {k: v.to(device) for k, v in batch.items() if k in ("attention_mask", "position_ids")}
    with autocast(device, dtype):
        return scored_logprobs(model, batch["input_ids"].to(device), batch["loss_mask"][:, 1:].to(device), **kwargs)


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device, dtype, max_batches: int = 0) -> float:
    """Token-weighted mean NLL over the assistant tokens of `examples` (length-sorted batches); under a
    launcher each rank scores its share and the sums are all-reduced."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    w = world()
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    if max_batches:
        ordered = ordered[: max_batches * batch_size]
    total, count = 0.0, 0.0
    for rows, weight in w.lockstep(ordered, batch_size):  # this rank's share; as many forwards on every rank
        batch = D.collate(rows, pad_id)
        logps = w.call(forward_logps, model, batch, device, dtype)
        m = batch["loss_mask"][:, 1:].to(device)
        total += -(logps * m).sum().item() * weight
        count += float(m.sum()) * weight
    model.train(was_training)
    return w.all_sum(total) / max(w.all_sum(count), 1)


def train(cfg: SFTConfig, on_step=None) -> dict:
    """Run SFT as `cfg` says. `on_step(step, run, model)` is called after each optimizer step (tests
    use it to interrupt a run). Returns the summary (status 'done', or 'interrupted' after a signal)."""
    t = cfg.train
    seed_everything(t.seed)
    device = default_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, tok = load_policy(cfg.model, device, dtype)
    train_set, eval_set = load_data(cfg, tok)
    if t.verbose:
        print("example (trained tokens in [[...]]):\n" + D.describe_example(tok, train_set[0]), file=sys.stderr)
    if cfg.data.packing:
        n_before = len(train_set)
        train_set = D.pack(train_set, cfg.data.max_length)
        log.info("packed %d examples into %d rows of <= %d tokens", n_before, len(train_set), cfg.data.max_length)
    pad_id = tok.pad_token_id

    total_steps, steps_per_epoch, optimizer, scheduler, guard = training_setup(t, model, len(train_set))

    lengths = [len(e["input_ids"]) for e in train_set] if t.group_by_length else None

    w = world()

    def step_fn(step: int):
        global_batches = [micro_batch(train_set, k, t.batch_size, t.seed, lengths)
                          for k in range(step * t.grad_accum, (step + 1) * t.grad_accum)]
        # normalise by the target tokens of the whole step over every rank, so accumulation and data
        # parallelism == one large batch (each rank knows the global micro-batches: no all-reduce needed)
        n_targets = sum(sum(e["loss_mask"][1:]) for mb in global_batches for e in mb)
        loss_sum, n_tokens = 0.0, 0
        for i, mb in enumerate(global_batches):
            rows, scale = w.rows(mb)
            b = D.collate(rows, pad_id)
            with w.no_sync(i == len(global_batches) - 1):
                loss = w.call(lambda: sft_loss(forward_logps(model, b, device, dtype), b["loss_mask"].to(device), n_targets)) * scale
                w.backward(loss)  # (a non-finite loss still backpropagates: every rank must; the step is skipped)
            loss_sum += loss.item()
            n_tokens += int(b["input_ids"].numel() * scale)
        return w.all_sum(loss_sum), {"train/epoch": (step + 1) / steps_per_epoch, "train/target_tokens": n_targets}, w.all_sum(n_tokens)

    eval_args = (t.batch_size, pad_id, device, dtype, t.eval_batches)
    with Run(t.out, cfg, resume=t.resume, report_to=t.report_to) as run:
        start = 0
        if t.resume and run.latest_checkpoint() is not None:
            start = run.load_checkpoint(model, optimizer, scheduler, guard)["step"]
        log.info("SFT: %d train / %d eval examples, %d steps, dtype %s, device %s, %d trainable params",
                 len(train_set), len(eval_set), total_steps, str(dtype).replace("torch.", ""), device, sum(p.numel() for p in model.parameters() if p.requires_grad))
        eval_fn = (lambda: {"eval/loss": evaluate(model, eval_set, *eval_args)}) if eval_set else None
        status, step, final = fit(run, t, model, optimizer, scheduler, step_fn, total_steps, start, eval_fn, on_step, guard, desc="sft")
        if status == "interrupted":
            return {"status": status, "step": step}
        final_eval = final.get("eval/loss", float("nan"))
        model_dir = save_model(model, tok, run, merge=cfg.model.merge)
        last_loss = next((m["train/loss"] for m in reversed(run.read_metrics()) if "train/loss" in m), float("nan"))
        initial = next((m["eval/loss"] for m in run.read_metrics() if m["step"] == 0 and "eval/loss" in m), float("nan"))
        return run.finish({
            "stage": "sft", "status": "done", "steps": step, "train/loss": last_loss,
            "eval/loss_initial": initial, "eval/loss": final_eval,
            "nan_skipped": guard.total, "model": str(model_dir),
            "train_examples": len(train_set), "eval_examples": len(eval_set),
        })
