"""Stage 2, the reward model: learn r(x, y) from pairwise preferences with Bradley-Terry,
P(y_c > y_r) = sigmoid(r(y_c) - r(y_r)).

Pairs are grouped by prompt: each micro-batch holds `train.batch_size` prompts, every distinct
response of those prompts is scored once, and all of their labelled pairs are read out of that one
vector of rewards (the InstructGPT trick). The loss of a step is the mean over its pairs, whatever
the accumulation, plus the reward-centring term. After training, the mean and std of the reward on
the training responses (the SFT model's samples) go into the saved config, so PPO can normalise.

`ensemble: K > 1` trains K reward models (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization"), one after the other, each exactly as a single one (`train_one`): member m with
seed `train.seed + m` (its head's initialisation and data order) and, with `ensemble_bootstrap`, on its
own bootstrap resample of the training prompts (drawn with that seed). Every member holds out the
same prompts (the split uses `train.seed`) and stores its statistics on the whole training split, so
normalised members share units. Layout:

  OUT/model/ensemble.json       {"kind": "tether-rm-ensemble", "members": ["member-0", ...], "seeds": [...], ...}
  OUT/model/member-<m>/         a reward-model folder, as a single run's OUT/model
  OUT/members/m<m>/             that member's run folder: config.yaml, metrics.jsonl, checkpoints/, summary.json
  OUT/summary.json              per-member metrics ("members") and the ensemble's (the mean normalised reward)

`--resume` skips finished members and continues the interrupted one from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import torch

from tether import data as D
from tether.config import RMConfig
from tether.errors import TetherError
from tether.losses.preference import bradley_terry_loss, pairwise_from_groups, reward_centering_loss
from tether.losses.rl import ensemble_reward, ensemble_std
from tether.models import (apply_lora, autocast, default_device, load_reward_model, resolve_dtype,
                           reward_normaliser, sequence_scores, write_ensemble_manifest)
from tether.distributed import world
from tether.runloop import Run, fit, micro_batch, save_model, seed_everything, training_setup

log = logging.getLogger("tether")


def load_groups(cfg: RMConfig, tok, split_seed: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt groups; the held-out prompts are drawn with `split_seed` (default train.seed)."""
    d = cfg.data
    if not d.path:
        raise TetherError("rm needs preference data: --data PAIRS.jsonl (columns prompt, chosen, rejected)")
    if d.packing:
        raise TetherError("data.packing is not supported for reward models")
    train, held = D.preference_splits(d, D.normalise_preferences, cfg.train.seed if split_seed is None else split_seed)
    return D.group_preferences(train, tok, d.max_length), D.group_preferences(held, tok, d.max_length)


def bootstrap(items: list, seed: int) -> list:
    """A bootstrap resample: len(items) draws with replacement, seeded (a fresh generator: the global RNG is untouched)."""
    rng = random.Random(seed)
    return [items[rng.randrange(len(items))] for _ in items]


def pair_stats(r_c: torch.Tensor, r_r: torch.Tensor, all_sum=None) -> dict:
    """Accuracy, mean margin, mean and (unbiased) std of the rewards of the pairs (r_c, r_r); with
    `all_sum` (World.all_sum) over every rank's pairs: the statistics are built from sums and counts."""
    delta = (r_c - r_r).detach().double()
    both = torch.cat([r_c, r_r]).detach().double()
    sums = torch.stack([torch.tensor(float(len(delta)), dtype=torch.float64), (delta > 0).double().sum(), delta.sum(),
                        both.sum(), (both**2).sum()])
    n, correct, margin, total, squares = (all_sum(sums) if all_sum else sums).tolist()
    var = (squares - total**2 / (2 * n)) / (2 * n - 1) if n > 0.5 else 0.0
    return {"accuracy": correct / n, "margin": margin / n, "reward_mean": total / (2 * n), "reward_std": max(var, 0.0) ** 0.5}


def score_groups(model, groups: list[dict], batch_size: int, pad_id: int, device, dtype):
    """Rewards of every response and every pair of `groups` (no grad): yields (batch, rewards)."""
    for i in range(0, len(groups), batch_size):
        b = D.collate_groups(groups[i : i + batch_size], pad_id)
        with autocast(device, dtype):  # (through the trained-module wrapper: sharded models gather their weights)
            rewards = world().call(sequence_scores, model, b["input_ids"].to(device), b["lengths"])
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
    """Train a reward model (`ensemble: 1`) or an ensemble of them; returns the run's summary."""
    if cfg.ensemble < 1:
        raise TetherError(f"ensemble must be >= 1 (the number of reward models; 1 = a single one), got {cfg.ensemble}")
    return train_one(cfg, on_step) if cfg.ensemble == 1 else train_ensemble(cfg, on_step)


def train_one(cfg: RMConfig, on_step=None, split_seed: int | None = None, bootstrap_seed: int | None = None,
              model_dir: Path | None = None, desc: str = "rm") -> dict:
    """One reward model in `train.out`. An ensemble's member passes the ensemble's `split_seed` (every
    member holds out the same prompts), a `bootstrap_seed` (it trains on a bootstrap resample of the
    training prompts; its reward statistics are still those of the whole training split) and its
    `model_dir` (ENSEMBLE/member-m instead of OUT/model)."""
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
    all_train, eval_groups = load_groups(cfg, tok, split_seed)
    train_groups = all_train if bootstrap_seed is None else bootstrap(all_train, bootstrap_seed)
    pad_id = tok.pad_token_id
    total_steps, _, optimizer, scheduler, guard = training_setup(t, model, len(train_groups))

    # a micro-batch is padded to its longest response
    lengths = [max(map(len, g["responses"])) for g in train_groups] if t.group_by_length else None

    w = world()

    def rm_loss(b, n_pairs):
        with autocast(device, dtype):
            rewards = sequence_scores(model, b["input_ids"].to(device), b["lengths"])
        r_c, r_r = pairwise_from_groups(rewards, b["chosen_idx"].to(device), b["rejected_idx"].to(device))
        p = b["p_chosen"].to(device) if L.soft_labels else None
        m = b["margin"].to(device) if L.use_margin else None
        loss = bradley_terry_loss(r_c, r_r, p, m, L.label_smoothing).sum() / n_pairs
        if L.center_coef:
            loss = loss + reward_centering_loss(r_c, r_r, L.center_coef) * len(r_c) / n_pairs
        return loss, r_c, r_r

    def step_fn(step: int):
        global_batches = [micro_batch(train_groups, k, t.batch_size, t.seed, lengths)
                          for k in range(step * t.grad_accum, (step + 1) * t.grad_accum)]
        # the step's loss is a mean over all its pairs, on every rank (each knows the global micro-batches)
        n_pairs = sum(len(g["pairs"]) for mb in global_batches for g in mb)
        loss_sum, rc, rr, n_tokens = 0.0, [], [], 0
        for i, mb in enumerate(global_batches):
            rows, scale = w.rows(mb)
            b = D.collate_groups(rows, pad_id)
            with w.no_sync(i == len(global_batches) - 1):
                loss, r_c, r_r = w.call(rm_loss, b, n_pairs)
                w.backward(loss * scale)  # (a non-finite loss still backpropagates on every rank; the step is skipped)
            loss_sum += loss.item() * scale
            if scale:
                rc.append(r_c)
                rr.append(r_r)
                n_tokens += int(b["lengths"].sum())
        empty = torch.zeros(0, device=device)
        stats = pair_stats(torch.cat(rc) if rc else empty, torch.cat(rr) if rr else empty, w.all_sum)
        return w.all_sum(loss_sum), {f"train/{k}": v for k, v in stats.items()} | {"train/pairs": n_pairs}, w.all_sum(n_tokens)

    with Run(t.out, cfg, resume=t.resume, report_to=t.report_to) as run:
        start = 0
        if t.resume and run.latest_checkpoint() is not None:
            start = run.load_checkpoint(model, optimizer, scheduler, guard)["step"]
        log.info("RM: %d train / %d eval prompts (%d / %d pairs), %d steps, dtype %s",
                 len(train_groups), len(eval_groups), sum(len(g["pairs"]) for g in train_groups),
                 sum(len(g["pairs"]) for g in eval_groups), total_steps, str(dtype).replace("torch.", ""))
        eval_fn = (lambda: evaluate(model, eval_groups, cfg, pad_id, device, dtype)) if eval_groups else None
        status, step, final = fit(run, t, model, optimizer, scheduler, step_fn, total_steps, start, eval_fn, on_step, guard, desc=desc)
        if status == "interrupted":
            return {"status": status, "step": step}
        mean, std = reward_statistics(model, all_train, cfg, pad_id, device, dtype)
        model.config.tether_reward_mean, model.config.tether_reward_std = mean, std
        model_dir = save_model(model, tok, run, merge=cfg.model.merge, model_dir=model_dir)
        last = next((m for m in reversed(run.read_metrics()) if "train/loss" in m), {})
        return run.finish({
            "stage": "rm", "status": "done", "steps": step, "train/loss": last.get("train/loss", float("nan")),
            "train/accuracy": last.get("train/accuracy", float("nan")), **final,
            "reward_mean": mean, "reward_std": std, "nan_skipped": guard.total, "model": str(model_dir),
            "train_prompts": len(train_groups), "eval_prompts": len(eval_groups),
            **({"bootstrap_seed": bootstrap_seed, "distinct_train_prompts": len({id(g) for g in train_groups})}
               if bootstrap_seed is not None else {}),
        })


# --------------------------------------------------------------------------------------------------
# Ensembles


def member_config(cfg: RMConfig, m: int) -> RMConfig:
    """Member m's config: a single reward model with seed train.seed + m in OUT/members/m<m>, resumed
    when the ensemble is resumed and the member has a checkpoint."""
    t = cfg.train
    out = Path(t.out) / "members" / f"m{m}"
    resume = t.resume and any((out / "checkpoints").glob("step-*/progress.json"))
    return replace(cfg, ensemble=1, train=replace(t, seed=t.seed + m, out=str(out), resume=resume, overwrite=False))


def _finished_member(out: Path) -> dict | None:
    try:
        s = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return s if s.get("status") == "done" and Path(s.get("model", "")).is_dir() else None


def train_ensemble(cfg: RMConfig, on_step=None) -> dict:
    t, K = cfg.train, cfg.ensemble
    out = Path(t.out)
    members_dir, ensemble_dir = out / "members", out / "model"
    work = any(members_dir.glob("m*/checkpoints/step-*")) or any(members_dir.glob("m*/summary.json"))
    if work and not t.resume and not t.overwrite and not (out / "summary.json").exists():
        raise TetherError(f"{out} holds members of an unfinished reward-model ensemble: pass --resume to continue it (finished "
                          "members are kept), --overwrite to start over (the folder is emptied first), or choose another --out")
    with Run(out, cfg, resume=t.resume, report_to="none") as run:
        members = []
        for m in range(K):
            mcfg = member_config(cfg, m)
            s = _finished_member(Path(mcfg.train.out)) if t.resume else None
            if s is not None:
                log.info("RM ensemble: member %d/%d finished earlier (%s), kept", m + 1, K, s["model"])
            else:
                if run.should_stop():
                    return {"status": "interrupted", "step": 0, "member": m}
                log.info("RM ensemble: member %d/%d, seed %d%s", m + 1, K, mcfg.train.seed,
                         ", bootstrap resample of the train prompts" if cfg.ensemble_bootstrap else "")
                s = train_one(mcfg, on_step, split_seed=t.seed, bootstrap_seed=mcfg.train.seed if cfg.ensemble_bootstrap else None,
                              model_dir=ensemble_dir / f"member-{m}", desc=f"rm {m + 1}/{K}")
                if s["status"] != "done":
                    return {"status": s["status"], "step": s["step"], "member": m}
            members.append({"member": m, "seed": mcfg.train.seed, **{k: v for k, v in s.items() if k not in ("stage", "status")}})
        names = [f"member-{m}" for m in range(K)]
        final = evaluate_ensemble(cfg, [ensemble_dir / n for n in names])
        if run.writes:
            write_ensemble_manifest(ensemble_dir, names, seeds=[x["seed"] for x in members], bootstrap=cfg.ensemble_bootstrap,
                                    base_model=cfg.model.name, reward_mean=[x["reward_mean"] for x in members],
                                    reward_std=[x["reward_std"] for x in members])
        steps = max(x["steps"] for x in members)
        if final:
            run.log(steps, final)
        return run.finish({
            "stage": "rm", "status": "done", "ensemble": K, "bootstrap": cfg.ensemble_bootstrap, "steps": steps, **final,
            "nan_skipped": sum(x["nan_skipped"] for x in members), "model": str(ensemble_dir),
            "train_prompts": members[0]["train_prompts"], "eval_prompts": members[0]["eval_prompts"], "members": members,
        })


@torch.no_grad()
def evaluate_ensemble(cfg: RMConfig, member_dirs: list[Path]) -> dict:
    """The ensemble's held-out metrics (the keys of `evaluate`, plus eval/ensemble_std), read from the
    saved members: the ensemble's reward is the mean of the members' normalised rewards
    (r_m - mean_m) / std_m (tether.losses.rl.ensemble_reward, mode mean), as PPO's default combines them;
    eval/ensemble_std is the members' mean disagreement (std across members, normalised units)."""
    device = default_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    batches, scores = None, []  # scores[m][i]: member m's normalised rewards of batch i's responses
    for d in member_dirs:
        model, tok = load_reward_model(str(d), cfg.model.trust_remote_code)
        if batches is None:
            _, eval_groups = load_groups(cfg, tok)
            if not eval_groups:
                return {}
        model.to(device).eval()
        mean, std = reward_normaliser(model)
        scored = list(score_groups(model, eval_groups, cfg.train.batch_size, tok.pad_token_id, device, dtype))
        batches = batches or [b for b, _ in scored]
        scores.append([(r - mean) / std for _, r in scored])
        del model
    losses, rc, rr, spread = [], [], [], []
    for i, b in enumerate(batches):
        z = torch.stack([s[i] for s in scores])  # (members, responses)
        r = ensemble_reward(z, "mean")
        spread.append(ensemble_std(z))
        r_c, r_r = pairwise_from_groups(r, b["chosen_idx"].to(r.device), b["rejected_idx"].to(r.device))
        losses.append(bradley_terry_loss(r_c, r_r))
        rc.append(r_c)
        rr.append(r_r)
    st = pair_stats(torch.cat(rc), torch.cat(rr))
    return {"eval/loss": torch.cat(losses).mean().item(), **{f"eval/{k}": v for k, v in st.items()},
            "eval/ensemble_std": torch.cat(spread).mean().item()}


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
