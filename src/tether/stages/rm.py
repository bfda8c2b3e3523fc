"""Stage 2, the reward model: learn r(x, y) from pairwise preferences with Bradley-Terry,
P(y_c > y_r) = sigmoid(r(y_c) - r(y_r)).

Pairs are grouped by prompt: each micro-batch holds `train.batch_size` prompts, every distinct
response of those prompts is scored once, and all of their labelled pairs are read out of that one
vector of rewards (the InstructGPT trick). The loss of a step is the mean over its pairs, whatever
the accumulation, plus the reward-centring term. After training, the mean and std of the reward on
the training responses (the SFT model's samples) go into the saved config, so PPO can normalise.
"""

from __future__ import annotations

import logging
import math
import random

import torch

from tether import data as D
from tether.config import RMConfig
from tether.errors import TetherError
from tether.losses.preference import bradley_terry_loss, pairwise_from_groups, reward_centering_loss
from tether.models import (apply_lora, autocast, default_device, load_reward_model, resolve_dtype,
                           save_pretrained, sequence_scores)
from tether.runloop import Run, fit, micro_batch, seed_everything, training_setup

log = logging.getLogger("tether")


def load_groups(cfg: RMConfig, tok) -> tuple[list[dict], list[dict]]:
    d = cfg.data
    if not d.path:
        raise TetherError("rm needs preference data: --data PAIRS.jsonl (columns prompt, chosen, rejected)")
    if d.packing:
        raise TetherError("data.packing is not supported for reward models")
    train, held = D.preference_splits(d, D.normalise_preferences, cfg.train.seed)
    return D.group_preferences(train, tok, d.max_length), D.group_preferences(held, tok, d.max_length)


def pair_stats(r_c: torch.Tensor, r_r: torch.Tensor) -> dict:
    delta = (r_c - r_r).detach()
    both = torch.cat([r_c, r_r]).detach()
    return {"accuracy": (delta > 0).float().mean().item(), "margin": delta.mean().item(),
            "reward_mean": both.mean().item(), "reward_std": both.std().item() if both.numel() > 1 else 0.0}


def score_groups(model, groups: list[dict], batch_size: int, pad_id: int, device, dtype):
    """Rewards of every response and every pair of `groups` (no grad): yields (batch, rewards)."""
    for i in range(0, len(groups), batch_size):
        b = D.collate_groups(groups[i : i + batch_size], pad_id)
        with autocast(device, dtype):
            rewards = sequence_scores(model, b["input_ids"].to(device), b["lengths"])
        yield b, rewards.float()


@torch.no_grad()
def evaluate(model, groups: list[dict], cfg: RMConfig, pad_id: int, device, dtype) -> dict:
    was = model.training
    model.eval()
    losses, rc, rr = [], [], []
    for b, rewards in score_groups(model, groups, cfg.train.batch_size, pad_id, device, dtype):
        r_c, r_r = pairwise_from_groups(rewards, b["chosen_idx"].to(device), b["rejected_idx"].to(device))
        losses.append(bradley_terry_loss(r_c, r_r))
        rc.append(r_c)
        rr.append(r_r)
    model.train(was)
    s = pair_stats(torch.cat(rc), torch.cat(rr))
    return {"eval/loss": torch.cat(losses).mean().item(), **{f"eval/{k}": v for k, v in s.items()}}


def train(cfg: RMConfig, on_step=None) -> dict:
    t, L = cfg.train, cfg.loss
    seed_everything(t.seed)
    device = default_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, tok = load_reward_model(cfg.model.name, cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora_r > 0:
        model = apply_lora(model, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout, cfg.model.lora_target, "SEQ_CLS")
    model.to(device)
    train_groups, eval_groups = load_groups(cfg, tok)
    pad_id = tok.pad_token_id
    total_steps, _, optimizer, scheduler, guard = training_setup(t, model, len(train_groups))

    # a micro-batch is padded to its longest response
    lengths = [max(map(len, g["responses"])) for g in train_groups] if t.group_by_length else None

    def step_fn(step: int):
        batches = [D.collate_groups(micro_batch(train_groups, k, t.batch_size, t.seed, lengths), pad_id)
                   for k in range(step * t.grad_accum, (step + 1) * t.grad_accum)]
        n_pairs = sum(len(b["chosen_idx"]) for b in batches)  # the step's loss is a mean over all its pairs
        loss_sum, rc, rr = 0.0, [], []
        for b in batches:
            with autocast(device, dtype):
                rewards = sequence_scores(model, b["input_ids"].to(device), b["lengths"])
            r_c, r_r = pairwise_from_groups(rewards, b["chosen_idx"].to(device), b["rejected_idx"].to(device))
            p = b["p_chosen"].to(device) if L.soft_labels else None
            m = b["margin"].to(device) if L.use_margin else None
            loss = bradley_terry_loss(r_c, r_r, p, m, L.label_smoothing).sum() / n_pairs
            if L.center_coef:
                loss = loss + reward_centering_loss(r_c, r_r, L.center_coef) * len(r_c) / n_pairs
            if not math.isfinite(loss.item()):
                return float("nan"), {}, 0
            loss.backward()
            loss_sum += loss.item()
            rc.append(r_c)
            rr.append(r_r)
        stats = pair_stats(torch.cat(rc), torch.cat(rr))
        n_tokens = sum(int(b["lengths"].sum()) for b in batches)
        return loss_sum, {f"train/{k}": v for k, v in stats.items()} | {"train/pairs": n_pairs}, n_tokens

    with Run(t.out, cfg, resume=t.resume, report_to=t.report_to) as run:
        start = 0
        if t.resume and run.latest_checkpoint() is not None:
            start = run.load_checkpoint(model, optimizer, scheduler, guard)["step"]
        log.info("RM: %d train / %d eval prompts (%d / %d pairs), %d steps, dtype %s",
                 len(train_groups), len(eval_groups), sum(len(g["pairs"]) for g in train_groups),
                 sum(len(g["pairs"]) for g in eval_groups), total_steps, str(dtype).replace("torch.", ""))
        eval_fn = (lambda: evaluate(model, eval_groups, cfg, pad_id, device, dtype)) if eval_groups else None
        status, step, final = fit(run, t, model, optimizer, scheduler, step_fn, total_steps, start, eval_fn, on_step, guard, desc="rm")
        if status == "interrupted":
            return {"status": status, "step": step}
        mean, std = reward_statistics(model, train_groups, cfg, pad_id, device, dtype)
        model.config.tether_reward_mean, model.config.tether_reward_std = mean, std
        model_dir = save_pretrained(model, tok, run.out, merge=cfg.model.merge)
        last = next((m for m in reversed(run.read_metrics()) if "train/loss" in m), {})
        return run.finish({
            "stage": "rm", "status": "done", "steps": step, "train/loss": last.get("train/loss", float("nan")),
            "train/accuracy": last.get("train/accuracy", float("nan")), **final,
            "reward_mean": mean, "reward_std": std, "nan_skipped": guard.total, "model": str(model_dir),
            "train_prompts": len(train_groups), "eval_prompts": len(eval_groups),
        })


@torch.no_grad()
def reward_statistics(model, groups: list[dict], cfg: RMConfig, pad_id: int, device, dtype, limit: int = 2048) -> tuple[float, float]:
    """Mean and std of the reward over (up to `limit`) training responses: what PPO normalises by."""
    was = model.training
    model.eval()
    rng = random.Random(0)
    sample = groups if sum(len(g["responses"]) for g in groups) <= limit else rng.sample(groups, max(1, limit // max(1, len(groups[0]["responses"]))))
    scores = torch.cat([r for _, r in score_groups(model, sample, cfg.train.batch_size, pad_id, device, dtype)])
    model.train(was)
    return scores.mean().item(), (scores.std().item() if scores.numel() > 1 else 1.0)
