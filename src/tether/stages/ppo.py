"""Stage 3, RL: maximise E[r(x, y)] - beta * KL(pi || pi_ref) with PPO (or GRPO, RLOO, REINFORCE).

One iteration, top to bottom (every detail visible, in the spirit of CleanRL's ppo.py):
  1. rollout   sample responses for a batch of prompts (KV cache, no autograd)
  2. evaluate  old log-probs of the policy, log-probs of the reference, values of the critic,
               all recomputed by a forward pass with dropout off, so the first ratio is exactly 1
  3. score     reward model (re-tokenised text, so its tokenizer may differ) or an ensemble of them (mean,
               uwo, wco), and/or a Python reward function; truncated responses get a penalty instead;
               normalise, clip
  4. rewards   per-token -beta * KL with the score on the last real token (EOS included)
  5. advantage GAE + whitening (PPO), group-normalised (GRPO), leave-one-out (RLOO), batch mean (REINFORCE)
  6. optimise  several epochs of shuffled minibatches: clipped policy loss, clipped value loss,
               entropy bonus, optional KL loss and PPO-ptx, gradient clipping; early stop on approx KL
  7. control   adaptive KL coefficient; metrics, samples, guards, checkpoints
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import sys
import time

import torch

from tether import data as D
from tether.config import PPOConfig
from tether.engine import Engine
from tether.errors import TetherError
from tether.losses import rl
from tether.losses.lm import sft_loss, token_logprobs
from tether.monitor import Monitor
from tether.models import (apply_lora, autocast, causal_mask, default_device, frozen_matrices_in, is_reward_ensemble,
                           load_causal_lm, load_reward_ensemble, load_reward_model, load_tokenizer, RemoteRewardModel, resolve_dtype,
                           reward_member_paths, reward_normaliser, score_conversations, token_scores)
from tether.rollout import generate, join, policy_forward, response_states, sample_batch, trim_padding, trunk
from tether.distributed import world
from tether.runloop import NanGuard, Run, make_optimizer, make_scheduler, save_model, seed_everything
from tether.tasks import load_task, subset

log = logging.getLogger("tether")


# --------------------------------------------------------------------------------------------------
# Forward passes over (query, response) batches


def critic_forward(critic, batch: dict) -> torch.Tensor:
    """V(x, y_<t) for each response token t (B, T): the head at the position before the token.
    (A ValueHead critic has no forward of its own: policy_forward reads it off the policy's pass.)"""
    ids, mask, at = join(batch)
    return response_states(critic(ids, mask), at)


class SeparateCritic(torch.nn.Module):
    """The critic as its own model with a scalar head (from the reward model, Huang et al. 2024, or a
    fresh head on the policy's weights); with LoRA, its own adapter on its own copy."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return token_scores(self.model, ids, mask)


class SharedCritic(torch.nn.Module):
    """The critic as a second LoRA adapter ('critic') on the policy's own base model plus a scalar head:
    one copy of the base weights serves policy, reference (adapters off) and critic.

    The policy is held outside this module's parameters (it is trained and saved as the policy); both
    adapters stay trainable: peft's set_adapter freezes the inactive one, and autograd drops the
    gradient of a leaf that no longer requires grad at backward time.
    """

    def __init__(self, policy, r: int, alpha: int, target: str):
        from peft import LoraConfig

        super().__init__()
        targets = target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
        policy.add_adapter("critic", LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
        self._policy = [policy]  # a list, so nn.Module does not register it as a submodule
        hidden = trunk(policy)[2].hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))  # as lm-human-preferences' heads
        torch.nn.init.zeros_(self.head.bias)
        _both_trainable(policy)

    def forward(self, ids, mask):
        policy = self._policy[0]
        policy.set_adapter("critic")
        try:
            hidden = trunk(policy)[0](input_ids=ids, attention_mask=causal_mask(mask), use_cache=False).last_hidden_state
        finally:
            policy.set_adapter("default")
            _both_trainable(policy)
        return self.head(hidden).squeeze(-1).float()


class ValueHead(torch.nn.Module):
    """The critic as a scalar head on the policy's own last hidden state (Ziegler et al. 2019's
    shared-trunk variant; TRL's former AutoModelForCausalLMWithValueHead): values come out of the
    policy's forward pass, so a PPO minibatch costs one forward and one backward instead of two of
    each. The value loss (times vf_coef) also trains the policy's weights; that coupling is the price."""

    def __init__(self, hidden: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _same_vocab(rm_tok, tok) -> bool:
    """True when token ids mean the same in both; a pad token the reward tokenizer added does not count."""
    a, b = rm_tok.get_vocab(), tok.get_vocab()
    if rm_tok.pad_token is not None and rm_tok.pad_token not in b:
        a = {k: v for k, v in a.items() if k != rm_tok.pad_token}
    return a == b


def _both_trainable(policy) -> None:
    policy.set_requires_grad(["default", "critic"], True)


def make_critic(cfg: PPOConfig, policy, tok, rm_tok=None):
    """None for critic-free algorithms; else a module mapping (ids, mask, positions) -> values (B, T).

    The critic reads the policy's tokens, so it can start from the reward model only when the two
    share a vocabulary; otherwise it starts from the policy (with a warning)."""
    P, M = cfg.ppo, cfg.model
    if P.algo != "ppo":
        return None
    from_rm = P.critic_init == "reward" and bool(cfg.reward.model)
    if from_rm and rm_tok is not None and not _same_vocab(rm_tok, tok):
        log.warning("the reward model's tokenizer differs from the policy's: the critic starts from the policy instead")
        from_rm = False
    mode = P.critic_backbone
    if mode == "head":
        if from_rm:
            log.warning("critic_backbone=head: the value head starts fresh on the policy's trunk, not from the reward model")
        return ValueHead(trunk(policy)[2].hidden_size)
    if mode == "auto":
        mode = "shared" if M.lora_r > 0 and not from_rm else "separate"
    if mode == "shared":
        if M.lora_r <= 0:
            raise TetherError("ppo.critic_backbone=shared needs LoRA (model.lora_r > 0): the critic is an adapter on the policy's base")
        if from_rm:
            log.warning("critic_backbone=shared: the critic starts from the policy's base, not from the reward model's weights")
        return SharedCritic(policy, M.lora_r, M.lora_alpha, M.lora_target)
    source = cfg.reward.model if from_rm else M.name
    if from_rm and is_reward_ensemble(source):
        source = reward_member_paths(source)[0]
        log.info("the critic starts from the reward-model ensemble's first member, %s", source)
    model, _ = load_reward_model(source)
    _no_dropout(model)
    if M.lora_r > 0:
        model = apply_lora(model, M.lora_r, M.lora_alpha, 0.0, M.lora_target, "SEQ_CLS")
    return SeparateCritic(model)


# --------------------------------------------------------------------------------------------------
# Rewards


class Scorer:
    """r(x, y) as configured: reward model * w_rm + gold * w_gold + python_function; a truncated
    response (no EOS) scores `missing_eos_penalty` instead, unless `score_truncated`.

    A reward-model ensemble (a folder with ensemble.json, `tether rm --set ensemble=K`) scores with every
    member; each member's score is normalised by its own statistics (stored, or its own running ones),
    shifted by the length debias if set (normalised units), and the members are combined by
    `reward.ensemble` (mean, uwo, wco: tether.losses.rl.ensemble_reward). `disagreement` then holds the
    last call's std across members per sample (None for a single reward model)."""

    def __init__(self, cfg: PPOConfig, task, device, dtype, reward_fn=None):
        r = cfg.reward
        self.cfg, self.task, self.device, self.dtype, self.fn = r, task, device, dtype, reward_fn
        self.has_gold = task is not None and getattr(task, "has_gold", True)
        self.rm_tok = None
        self.members: list = []  # the reward models: one, or an ensemble's members
        self.stats: list[tuple[float, float]] = []
        self.ensemble = bool(r.model) and is_reward_ensemble(r.model)
        self.disagreement: torch.Tensor | None = None
        self.remote = None
        if r.model and r.url:
            raise TetherError("reward.model and reward.url both name a reward model; choose one")
        if r.url:  # a reward model served elsewhere: its members and stored statistics come from the server
            self.remote = RemoteRewardModel(r.url, r.api_key_env)
            self.members = [None] * self.remote.n_members
            self.stats = self.remote.stats
            self.ensemble = self.remote.n_members > 1
            log.info("reward: the reward model at %s (%d member%s)", r.url, self.remote.n_members, "s" * self.ensemble)
        elif r.model:
            self.members, self.rm_tok = load_reward_ensemble(r.model)
            for m in self.members:
                m.to(device).eval().requires_grad_(False)
            self.stats = [reward_normaliser(m) for m in self.members]  # each member's stored (mean, std)
            if self.ensemble:
                log.info("reward: an ensemble of %d reward models, combined by %s%s", len(self.members), r.ensemble,
                         f" (lambda {r.uwo_lambda:g})" if r.ensemble == "uwo" else "")
            elif r.ensemble != "mean":
                log.warning("reward.ensemble=%s with a single reward model: one member has no spread, so the reward is its "
                            "score (train an ensemble with `tether rm --set ensemble=K`)", r.ensemble)
        if not (r.model or r.url or r.gold_weight or reward_fn):
            raise TetherError("ppo needs a reward: --reward-model RM_FOLDER, --reward-fn module:function and/or "
                              "--set reward.gold_weight=1")
        if r.gold_weight and not self.has_gold:
            raise TetherError("reward.gold_weight needs a task with a gold scorer; your own prompts have none")
        # normalize=running: count, mean, M2 (Welford) per reward model (one for a single RM), checkpointed
        self.running = [[0, 0.0, 0.0] for _ in self.members]
        # data parallelism: (this rank's rows) -> (the global batch's rows), so the running statistics
        # are those of the global batch on every rank
        self.gather = None

    @torch.no_grad()
    def __call__(self, prompts, texts: list[str], finished: list[bool], update: bool = True) -> tuple[torch.Tensor, list[float] | None]:
        """(scores (B,), gold (B,) or None without a gold scorer). Gold is computed whenever the task has
        a scorer, for monitoring. update=False leaves the running normalisation as it is (held-out scoring)."""
        B = len(texts)
        score = torch.zeros(B)
        if self.members:
            convs = [p.messages + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
            # re-tokenised with the RM's own tokenizer and template: any RM tokenizer; one batch
            raw = (self.remote.score(convs) if self.remote is not None else
                   score_conversations(self.members, self.rm_tok, convs, self.device, self.dtype, batch_size=B, max_length=1024))
            debias = (self.cfg.length_slope * (torch.tensor([float(len(t)) for t in texts]) - self.cfg.length_center)
                      if self.cfg.length_slope else 0.0)  # a length-debiased RM: its linear length component taken out
            if self.ensemble:
                z = torch.stack([self._normalise(x, k, update) for k, x in enumerate(raw)]) - debias  # (members, B)
                self.disagreement = rl.ensemble_std(z)
                rm = rl.ensemble_reward(z, self.cfg.ensemble, self.cfg.uwo_lambda)
            else:
                rm = self._normalise(raw[0] - debias, 0, update)  # (any reward.ensemble of one member is its score)
            score += self.cfg.model_weight * rm
        gold = [self.task.gold(p, t, f).score for p, t, f in zip(prompts, texts, finished)] if self.has_gold else None
        if self.cfg.gold_weight:
            score += self.cfg.gold_weight * torch.tensor(gold)
        if self.fn is not None:
            score += torch.tensor([float(self.fn(p.text, t)) for p, t in zip(prompts, texts)])
        if self.cfg.clip:
            score = score.clamp(-self.cfg.clip, self.cfg.clip)
        if not self.cfg.score_truncated:
            score = torch.where(torch.tensor(finished, dtype=torch.bool), score, torch.full_like(score, self.cfg.missing_eos_penalty))
        return score, gold

    def _normalise(self, r: torch.Tensor, member: int, update: bool = True) -> torch.Tensor:
        """(r - mean) / std with reward model `member`'s stored statistics, its running ones, or none."""
        if self.cfg.normalize == "none":
            return r
        if self.cfg.normalize == "stored":
            mean, std = self.stats[member]
            return (r - mean) / std
        state = self.running[member]
        seen = self.gather(r) if self.gather is not None and update else r
        for x in seen.tolist() if update else []:  # Welford's online mean and variance
            n, mean, m2 = state
            n += 1
            d = x - mean
            mean += d / n
            state[:] = [n, mean, m2 + d * (x - mean)]
        n, mean, m2 = state
        return (r - mean) / (math.sqrt(m2 / (n - 1)) if n > 1 and m2 > 0 else 1.0)


def load_reward_fn(spec: str):
    """`package.module:function`, called as function(prompt: str, response: str) -> float. Importing it
    runs that module's code: a recipe naming one is code (README, "A recipe is code")."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise TetherError(f"reward.function '{spec}': expected package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TetherError(f"cannot load reward function '{spec}': {e}") from None
    if not callable(fn):
        raise TetherError(f"reward.function '{spec}' is not callable")
    return fn


def group_size(cfg: PPOConfig) -> int:
    """Samples per prompt: rollout.group_size, or (0 = auto) 4 for the group-baseline algorithms, else 1."""
    G = cfg.rollout.group_size or (4 if cfg.ppo.algo in ("grpo", "rloo") else 1)
    if cfg.ppo.algo in ("grpo", "rloo") and G < 2:
        raise TetherError(f"{cfg.ppo.algo} needs rollout.group_size >= 2 samples per prompt (0 = 4)")
    return G


def make_engine(cfg: PPOConfig, policy, tok, dtype):
    """The rollout engine: tether's own (tether.engine) or, with rollout.engine=vllm, a colocated vLLM (tether.vllm_engine)."""
    if cfg.rollout.engine == "hf":
        return Engine(policy, tok, dtype)
    from tether.models import model_folder
    from tether.vllm_engine import VLLMEngine

    R = cfg.rollout
    return VLLMEngine(policy, tok, model_folder(cfg.model.name), dtype, R.vllm_gpu_memory, R.vllm_sleep,
                      seed=cfg.train.seed)


def load_engine(engine, policy, w) -> None:
    """The policy's current weights into the rollout engine; under FSDP gathered from every rank's shards first."""
    if w.sharded():
        engine.load_weights(policy, state=w.full_state_dict(policy, everywhere=True))
    else:
        engine.load_weights(policy)


def check_world(cfg: PPOConfig, n_groups: int, G: int, W: int) -> None:
    """Under W > 1 processes the global batch (prompts_per_step groups of G samples) must split into equal
    shares of whole groups, and each minibatch must take the same number of whole-group rows from every
    rank (losses.rl.minibatch_partition), so W processes run exactly the minibatches one process runs."""
    if W == 1:
        return
    P = cfg.ppo
    if n_groups % W:
        raise TetherError(f"rollout.prompts_per_step={n_groups} is not divisible by the world size {W}: "
                          f"each process samples an equal share of the prompts; use a multiple of {W}")
    if P.minibatch_size % (G * W) or (n_groups * G) % P.minibatch_size:
        raise TetherError(f"ppo.minibatch_size={P.minibatch_size} must be a multiple of group_size x world size "
                          f"({G} x {W} = {G * W}) and divide the global batch ({n_groups} prompts x {G} = "
                          f"{n_groups * G} samples) when training on {W} processes")


class RowLayout:
    """Which rows of an iteration's global batch this rank holds: the prompt groups g = rank (mod W) of the
    `n_groups` sampled prompts, each group's G rows consecutive (global row = g * G + j). `gather` and
    `gather_list` bring every rank's rows back in the global batch's order (one process: the identity)."""

    def __init__(self, w, n_groups: int, G: int):
        self.w = w
        self.groups = list(range(w.rank, n_groups, w.size))

        def rows_of(rank):
            return [g * G + j for g in range(rank, n_groups, w.size) for j in range(G)]

        self.global_rows = rows_of(w.rank)
        self.local = {r: i for i, r in enumerate(self.global_rows)}
        # position in the rank-ordered concatenation -> global row, inverted: global row -> position
        where = torch.tensor([r for rank in range(w.size) for r in rows_of(rank)])
        self.order = torch.empty(len(where), dtype=torch.long)
        self.order[where] = torch.arange(len(where))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.w.size == 1:
            return x
        flag = x.dtype == torch.bool
        y = self.w.all_gather(x.long() if flag else x)[self.order.to(x.device)]
        return y.bool() if flag else y

    def gather_list(self, items: list) -> list:
        if self.w.size == 1:
            return items
        flat = [v for part in self.w.gather_objects(list(items)) for v in part]
        return [flat[i] for i in self.order.tolist()]


def kl_setup(P) -> tuple[bool, str]:
    """(KL as a loss term?, its estimator). GRPO always puts the KL in the loss (Shao et al. 2024);
    the others put it in the reward unless kl_in_reward is off. `auto` picks k1 in the reward (an
    unbiased value) and k3 as a loss (GRPO's); k1 as a loss has zero expected gradient (losses.rl.kl_loss)."""
    as_loss = P.algo == "grpo" or not P.kl_in_reward
    est = P.kl_estimator if P.kl_estimator != "auto" else ("k3" if as_loss else "k1")
    if as_loss and est == "k1":
        raise TetherError("ppo.kl_estimator=k1 as a KL loss term has zero expected gradient (it would not hold the "
                          "policy near the reference): use k2 (the gradient of KL(pi||ref)) or k3 (GRPO's), or put the "
                          "KL in the reward (ppo.kl_in_reward=true; not available for grpo)")
    return as_loss, est


def load_prompts_task(cfg: PPOConfig):
    """The task whose prompts RL samples: your own prompt file (data.path, no gold scorer) or cfg.task."""
    if cfg.data.path:
        from tether.tasks.prompts import PromptFileTask

        return PromptFileTask(cfg.data.path, cfg.data.eval_path)
    if cfg.data.eval_path:
        raise TetherError("data.eval_path (--eval-prompts) needs data.path (--prompts): your own train prompts")
    return load_task(cfg.task.name)


# --------------------------------------------------------------------------------------------------
# The loop


def train(cfg: PPOConfig, reward_fn=None, on_step=None) -> dict:
    t, P, R = cfg.train, cfg.ppo, cfg.rollout
    algo = P.algo
    G = group_size(cfg)
    kl_as_loss, kl_est = kl_setup(P)
    task = load_prompts_task(cfg)  # before anything is loaded or written: bad prompt files fail fast
    has_gold = getattr(task, "has_gold", True)
    if not has_gold:
        if cfg.monitor.keep_best == "gold":
            raise TetherError("monitor.keep_best=gold needs a gold scorer; your own prompts have none (use keep_best=proxy)")
        log.info("these prompts have no gold scorer: gold metrics and the gold-vs-proxy check are off (absent, not zero)")
    prompts_all = subset(task.prompts("train"), cfg.task.num_prompts, "train-prompts")
    if not prompts_all:
        raise TetherError(f"no train prompts in {cfg.data.path or cfg.task.name}")
    n_groups = min(R.prompts_per_step, len(prompts_all))  # prompts sampled per iteration, G samples each
    w = world()
    check_world(cfg, n_groups, G, w.size)  # a batch that does not split over the ranks fails before anything loads
    if R.engine == "vllm":
        from tether.vllm_engine import check_available

        check_available()  # no vLLM, or no CUDA: a clear error before anything loads
    held_out = subset(task.prompts("eval"), cfg.eval_prompts, "eval-prompts") if cfg.eval_prompts else []
    seed_everything(t.seed)
    device = default_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    tok.padding_side = "left"

    # Roles. With LoRA the reference is the same base with adapters disabled: no second copy.
    policy = load_causal_lm(cfg.model.name, cfg.model.trust_remote_code)
    _no_dropout(policy)
    ref = None
    if cfg.model.lora_r > 0:
        policy = apply_lora(policy, cfg.model.lora_r, cfg.model.lora_alpha, 0.0, cfg.model.lora_target)
        frozen_matrices_in(policy, dtype)  # the base (and so the reference) in bf16 under bf16 autocast
    else:
        ref = load_causal_lm(cfg.model.name, cfg.model.trust_remote_code).eval().requires_grad_(False).to(device)
    policy.to(device)
    scorer = Scorer(cfg, task, device, dtype, reward_fn or load_reward_fn(cfg.reward.function))
    critic = make_critic(cfg, policy, tok, scorer.rm_tok)
    if critic is not None:
        critic.to(device)
    engine = make_engine(cfg, policy, tok, dtype)  # the rollout engine: its own no-grad copy of the weights
    ptx = None
    if P.ptx_coef > 0:
        ptx = D.prepare_sft(tok, D.read_rows(P.ptx_data), 256, "truncate")

    modules = torch.nn.ModuleDict({"policy": policy} | ({"critic": critic} if critic is not None else {}))
    params = [p for p in modules.parameters() if p.requires_grad]
    # the shared optimizer set-up (no decay on norms and biases); eps 1e-5 as in CleanRL's PPO
    optimizer = make_optimizer(params, t.lr, t.weight_decay, eps=1e-5)
    # under a launcher: policy and critic wrapped for the engine (DDP, FSDP, DeepSpeed); a step may leave the
    # policy out (critic warm-up), so DDP looks for unused parameters
    optimizer = w.prepare(dict(modules.items()), optimizer, unused=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]  # (FSDP replaces them with their shards)
    ref_call = w.frozen({"ref": ref}) if ref is not None else None  # under FSDP the reference is sharded too
    scheduler = make_scheduler(optimizer, t.schedule, t.warmup_steps, t.max_steps)
    guard = NanGuard(P.max_nan_skips)
    beta = P.kl_coef
    ref_length = 0.0  # mean response length of the first rollout: the reference point for length drift
    monitor = Monitor(cfg.monitor)
    best = {"value": None, "step": None}  # monitor.keep_best: the best policy so far, kept in OUT/best
    stopped_early = None

    rows = RowLayout(w, n_groups, G)
    scorer.gather = rows.gather if w.size > 1 else None

    with Run(t.out, cfg, resume=t.resume, report_to=t.report_to) as run:
        it = 0
        if t.resume and run.latest_checkpoint() is not None:
            progress = run.load_checkpoint(modules, optimizer, scheduler, guard)
            it, beta, best, ref_length = progress["step"], progress["beta"], progress["best"], progress["ref_length"]
            monitor.load_state(progress["monitor"])
            running = progress.get("reward_running", scorer.running)  # normalize=running continues where it stopped
            scorer.running = [running] if running and not isinstance(running[0], list) else running  # (older: one triple)
        log.info("%s: %d iterations x %d prompts x %d samples, dtype %s", algo.upper(), t.max_steps, R.prompts_per_step,
                 G, str(dtype).replace("torch.", ""))
        if it == 0 and held_out:
            run.log(0, heldout_eval(policy, tok, task, held_out, R, device, dtype, scorer, engine))
        while it < t.max_steps:
            timings = {}
            # ---- 1. rollout ---------------------------------------------------------------------
            t0 = time.time()
            order = torch.randperm(len(prompts_all), generator=torch.Generator().manual_seed(t.seed * 7919 + it))
            chosen = order[: R.prompts_per_step].tolist()
            # this rank's prompt groups: g = rank (mod W), each with its G samples (a group never straddles ranks)
            prompts = [prompts_all[chosen[g]] for g in rows.groups for _ in range(G)]
            load_engine(engine, policy, w)  # the rollout engine samples with the policy as it is now (bf16 copy)
            # seeded per global row: a response does not depend on which rank or batch samples it
            seeds = [(t.seed * 1_000_003 + it * 10_007 + r) % 2**31 for r in rows.global_rows]
            batch = sample_batch(policy, tok, prompts, R, device, engine, seeds)  # log-probs are recomputed below: ratio exactly 1
            timings["time/generate"] = time.time() - t0
            lengths, mask = batch["lengths"], batch["mask"]
            # ---- 2. old log-probs, reference log-probs, values (no autograd) --------------------
            t0 = time.time()
            head = critic if isinstance(critic, ValueHead) else None
            # One epoch, one optimizer step over the whole batch, nothing in the rewards that needs them
            # (critic-free, KL as a loss): every minibatch's forward runs before the update, so the old
            # log-probs are that forward's own (detached; ratio exactly 1) and need no pass of their own.
            on_policy = (critic is None and kl_as_loss and P.epochs == 1 and ptx is None
                         and math.ceil(n_groups * G / P.minibatch_size) <= P.grad_accum)
            old_logp = old_values = None
            with torch.no_grad(), autocast(device, dtype):  # (the trained modules through w.call: FSDP gathers their shards)
                if not on_policy:
                    old_logp, _, old_values = w.call(policy_forward, policy, batch, R.temperature, value_head=head)
                if ref is None:
                    with policy.disable_adapter():
                        ref_logp, _, _ = policy_forward(policy, batch, R.temperature)
                else:
                    ref_logp, _, _ = ref_call(policy_forward, ref, batch, R.temperature)
                if critic is not None and head is None:
                    old_values = w.call(critic_forward, critic, batch)
            old_values = old_values.float() * mask if old_values is not None else None
            ref_logp = ref_logp * mask
            old_logp = old_logp * mask if old_logp is not None else torch.zeros_like(ref_logp)  # on_policy: filled by optimise
            timings["time/forward"] = time.time() - t0
            # ---- 3. score -----------------------------------------------------------------------
            t0 = time.time()
            texts, finished = batch["texts"], batch["finished"]
            score, gold = scorer(prompts, texts, finished.tolist())  # truncated responses: the penalty
            disagreement = scorer.disagreement if scorer.ensemble else None  # (members' std per sample)
            score = score.to(device)
            timings["time/score"] = time.time() - t0
            # ---- 4. rewards and 5. advantages ---------------------------------------------------
            if not on_policy:  # (on_policy: the KL is logged after optimise has filled old_logp)
                kl = rl.kl_estimate(old_logp, ref_logp, kl_est) * mask  # per token; in the reward or (kl_as_loss) logged
                seq_kl = kl.sum(1)
            all_sum = w.all_sum if w.size > 1 else None  # statistics over the global batch, every rank's rows
            n_tok = w.all_sum(mask.sum())  # the global batch's real tokens
            if algo == "ppo":
                rewards = rl.kl_penalised_rewards(score, torch.zeros_like(kl) if kl_as_loss else kl, beta, lengths)
                adv, returns = rl.gae(rewards, old_values, mask, P.gamma, P.lam)
                adv_mean, adv_var = rl.masked_moments(adv, mask, all_sum)  # the whitening statistics (logged)
                if P.whiten_advantages:
                    adv = rl.masked_whiten(adv, mask, all_sum=all_sum)
            else:
                seq_reward = score if kl_as_loss else score - beta * seq_kl
                if algo == "grpo":
                    a = rl.grpo_advantages(seq_reward, G, P.grpo_scale_std)
                elif algo == "rloo":
                    a = rl.rloo_advantages(seq_reward, G)
                else:  # REINFORCE: the global batch's mean reward as the baseline
                    a = seq_reward - w.all_sum(seq_reward.sum()) / (len(seq_reward) * w.size)
                adv, returns = a[:, None] * mask, None
                adv_mean, adv_var = rl.masked_moments(a, torch.ones_like(a), all_sum)  # per sequence
            adv_stats = {"advantages/mean_raw": adv_mean.item(), "advantages/std_raw": adv_var.clamp(min=0).sqrt().item(),
                         "advantages/abs_mean": w.all_sum(rl.masked_mean(adv.abs(), mask, total=n_tok)).item()}
            # ---- 6. optimise --------------------------------------------------------------------
            t0 = time.time()
            stats = optimise(cfg, policy, critic, optimizer, params, guard, batch, old_logp, ref_logp, old_values,
                             adv, returns, beta, it < P.critic_warmup_steps, ptx, tok, device, dtype,
                             kl_est if kl_as_loss else None, fill_old=on_policy, rows=rows, it=it)
            scheduler.step()
            timings["time/train"] = time.time() - t0
            if on_policy:
                seq_kl = (rl.kl_estimate(old_logp, ref_logp, kl_est) * mask).sum(1)
            # the rollout engine's log-probs of its own samples against the trainer's (bf16 copy, or vLLM's kernels)
            engine_gap = {"rollout/engine_logp_gap": (w.all_sum(((old_logp - batch["engine_logp"]).abs() * mask).sum()) / n_tok).item(),
                          "rollout/engine_kl": (w.all_sum(((batch["engine_logp"] - old_logp) * mask).sum()) / n_tok).item()}
            # ---- 7. KL control, metrics, samples, checkpoints -----------------------------------
            # every statistic below is over the global batch: this rank's rows gathered with the others'
            # (one process: the rows themselves), in the global batch's order
            score, seq_kl, lengths, finished = (rows.gather(x) for x in (score, seq_kl, lengths, finished.to(device)))
            texts, prompts = rows.gather_list(texts), rows.gather_list(prompts)
            gold = rows.gather_list(gold) if gold is not None else None
            disagreement = rows.gather(disagreement.to(device)) if disagreement is not None else None
            mean_kl = seq_kl.mean().item()
            if P.adaptive_kl:
                beta = rl.adaptive_kl_beta(beta, mean_kl, P.kl_target, P.kl_horizon, len(prompts))
            it += 1
            n_tokens = int(lengths.sum())
            non_score = (-beta * seq_kl).mean().item()
            metrics = {
                "objective/scores": score.mean().item(), "objective/kl": mean_kl,
                "objective/entropy": stats.pop("entropy"), "objective/non_score_reward": non_score,
                "objective/rlhf_reward": score.mean().item() + non_score,
                **({"objective/gold": sum(gold) / len(gold)} if gold is not None else {}), "kl/beta": beta,
                "response/length_mean": lengths.float().mean().item(), "response/eos_rate": finished.float().mean().item(),
                **stats, **adv_stats, **engine_gap, **timings, "throughput/tokens_per_s": n_tokens / max(1e-9, sum(timings.values())),
                "train/lr": scheduler.get_last_lr()[0], "train/nan_skipped": guard.total,
            }
            if disagreement is not None:  # a reward-model ensemble: the members' mean std on these samples
                metrics["objective/ensemble_std"] = disagreement.mean().item()
            # ---- over-optimisation monitor (proxy vs gold vs sqrt KL, length, repetition, disagreement) -
            done = finished.tolist()
            mon, flags = monitor.update(it, metrics["objective/scores"], metrics.get("objective/gold"), mean_kl,
                                        [x for x, d in zip(score.tolist(), done) if d], [n for n, d in zip(lengths.tolist(), done) if d], texts,
                                        disagreement=metrics.get("objective/ensemble_std"))
            metrics |= mon
            run.log(it, metrics)
            for f in flags:
                log.warning("monitor, iteration %d: %s", it, f.message)
                if run.writes:
                    with open(run.out / "monitor.jsonl", "a") as fh:
                        fh.write(json.dumps(f.__dict__) + "\n")
            ref_length = ref_length or metrics["response/length_mean"]
            warn(metrics, ref_length)
            gold_txt = f"gold {metrics['objective/gold']:.3f}  " if gold is not None else ""
            if run.writes:
                print(f"{algo} {it}/{t.max_steps}  score {metrics['objective/scores']:+.3f}  {gold_txt}"
                      f"kl {mean_kl:.3f}  len {metrics['response/length_mean']:.1f}  "
                      f"gen {timings['time/generate']:.1f}s fwd {timings['time/forward']:.1f}s score {timings['time/score']:.1f}s "
                      f"train {timings['time/train']:.1f}s",
                      file=sys.stderr, flush=True)
            if cfg.sample_every and it % cfg.sample_every == 0 and run.writes:
                table = [{"step": it, "prompt": p.text, "response": txt, "score": s, **({"gold": gold[i]} if gold is not None else {})}
                         for i, (p, txt, s) in enumerate(list(zip(prompts, texts, score.tolist()))[:8])]
                with open(run.out / "samples.jsonl", "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in table))
                cols = ["prompt", "response", "score"] + (["gold"] if gold is not None else [])
                run.log_text(it, "samples", "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n" + "\n".join(
                    "| " + " | ".join(_cell(r[c]) if isinstance(r[c], str) else f"{r[c]:.3f}" for c in cols) + " |" for r in table))
            value = None
            if t.eval_every and it % t.eval_every == 0 and held_out:
                ev = heldout_eval(policy, tok, task, held_out, R, device, dtype, scorer, engine)
                run.log(it, ev)
                value = ev.get("eval/gold") if cfg.monitor.keep_best == "gold" else None
            if cfg.monitor.keep_best == "proxy" and (not cfg.monitor.kl_budget or mean_kl <= cfg.monitor.kl_budget):
                value = metrics["objective/scores"]
            if value is not None and (best["value"] is None or value > best["value"]):
                best = {"value": value, "step": it, "kind": cfg.monitor.keep_best, "kl": mean_kl}
                save_model(policy, tok, run, merge=cfg.model.merge, folder=run.out / "best")
                if run.writes:
                    (run.out / "best" / "best.json").write_text(json.dumps(best, indent=2))
            if on_step is not None:
                on_step(it, run, modules)
            if cfg.monitor.stop_on_flag and any(f.flag in ("gold_falls_while_proxy_rises", "ensemble_disagreement") for f in flags):
                stopped_early = f"over-optimisation flagged at iteration {it}"
                log.warning("monitor: stopping (%s); the best policy so far is in %s", stopped_early, run.out / "best")
                break
            progress = {"beta": beta, "nan_skipped": guard.total, "best": best, "ref_length": ref_length, "monitor": monitor.state(),
                        "reward_running": scorer.running}
            if run.should_stop() or (t.save_every and it % t.save_every == 0 and it < t.max_steps):
                run.save_checkpoint(it, modules, optimizer, scheduler, progress, t.keep_checkpoints)
            if run.stop_requested:
                print(f"tether: stopped at iteration {it}; checkpoint saved. Continue with --resume.", file=sys.stderr)
                return {"status": "interrupted", "step": it}
        progress = {"beta": beta, "nan_skipped": guard.total, "best": best, "ref_length": ref_length, "monitor": monitor.state(),
                    "reward_running": scorer.running}
        run.save_checkpoint(it, modules, optimizer, scheduler, progress, t.keep_checkpoints)
        final = heldout_eval(policy, tok, task, held_out, R, device, dtype, scorer, engine) if held_out else {}
        if final:
            run.log(it, final)
        first = next((m for m in run.read_metrics() if m["step"] == 0 and any(k.startswith("eval/") for k in m)), {})
        evals = {f"{k}_initial": first[k] for k in final if k in first} | final  # eval/gold only where there is gold
        model_dir = save_model(policy, tok, run, merge=cfg.model.merge)
        last = run.read_metrics()[-1] if run.read_metrics() else {}
        return run.finish({"stage": "ppo", "algo": algo, "status": "done", "steps": it, **evals, "has_gold": has_gold,
                           **{k: v for k, v in last.items() if k.startswith(("objective/", "response/", "rollout/"))},
                           "kl/beta": beta, "nan_skipped": guard.total, "model": str(model_dir),
                           "monitor": {"flags": monitor.counts(), "first_flag": {f.flag: f.step for f in reversed(monitor.flags)},
                                       "stopped_early": stopped_early},
                           **({"best": {**best, "model": str(run.out / "best" / "model")}} if best["step"] is not None else {})})


def optimise(cfg, policy, critic, optimizer, params, guard, batch, old_logp, ref_logp, old_values, adv, returns,
             beta, critic_only, ptx, tok, device, dtype, kl_loss_est=None, fill_old: bool = False,
             rows: RowLayout | None = None, it: int = 0) -> dict:
    """Clipped PPO epochs over one rollout batch. kl_loss_est: the KL as a loss term with that
    estimator (GRPO, kl_in_reward off), None when the KL is in the reward. `critic_only` (critic
    warm-up) trains the value function alone: no policy, entropy, KL or ptx term. `fill_old` (one
    epoch, one optimizer step): each minibatch's own detached log-probs are its old ones, written into
    old_logp.

    Data parallelism (`rows`: this rank's rows of the global batch): the minibatches are those of the
    global batch (losses.rl.minibatch_partition, seeded by the iteration and epoch), each rank runs its
    share, every loss is normalised by the global minibatch's count, and every statistic (the early-stop
    approx KL included) is all-reduced, so W processes take the optimizer steps one process takes."""
    P = cfg.ppo
    w = world()
    rows = rows or RowLayout(w, len(batch["lengths"]), 1)
    norm, budget = P.loss_norm, cfg.rollout.max_new_tokens  # Dr. GRPO's constant: the generation budget
    mask = batch["mask"]
    n_global = len(rows.global_rows) * w.size
    keys = ("query_ids", "query_mask", "response_ids", "lengths", "mask")
    acc: dict[str, list] = {}
    first_ratio = None
    head = critic if isinstance(critic, ValueHead) else None  # values from the policy's own forward

    def minibatch_loss(mb, idx, m, total, n_tokens):
        """(Run under autocast, through w.call.) The minibatch share's loss (normalised by the global minibatch's `total`) and its statistics as
        sums over its tokens (`n` real tokens), for the all-reduce."""
        logp, ent, values = policy_forward(policy, mb, cfg.rollout.temperature, with_entropy="grad" if P.ent_coef else True,
                                           value_head=head)
        if fill_old:
            old_logp[idx, : m.shape[1]] = logp.detach() * m
        T = m.shape[1]
        tis = (rl.truncated_importance_weights(old_logp[idx, :T], batch["engine_logp"][idx, :T], m, cfg.rollout.tis_cap)
               if cfg.rollout.engine != "hf" and cfg.rollout.tis_cap > 0 else None)  # vLLM's sampling != the trainer's
        pg_loss, s = rl.ppo_policy_loss(logp, old_logp[idx, :T], adv[idx, :T], m, P.clip, P.dual_clip or None, norm, budget, total, tis)
        n = float(m.sum())
        parts = {"tokens": n, "policy/clipfrac": s["clipfrac"] * n, "policy/approxkl": s["approxkl"] * n,
                 "policy/ratio_mean": s["ratio_mean"] * n, "entropy": rl.masked_mean(ent.detach(), m).item() * n,
                 "loss/policy": pg_loss.item()}
        loss = torch.zeros((), device=device) if critic_only else pg_loss - P.ent_coef * rl.aggregate(ent, m, norm, budget, total)
        if kl_loss_est is not None and not critic_only:  # the KL as a loss term (GRPO; kl_in_reward off)
            kl_term = rl.aggregate(rl.kl_loss(logp, ref_logp[idx, :T], kl_loss_est), m, norm, budget, total)
            loss = loss + beta * kl_term
            parts["loss/kl"] = kl_term.item()
        if tis is not None:
            parts["rollout/tis_weight_mean"] = float((tis * m).sum())
            parts["rollout/tis_capped"] = float(((tis >= cfg.rollout.tis_cap) * m).sum())
        if critic is not None:
            if head is None:
                values = critic_forward(critic, mb)
            vf_loss, vf_clipfrac = rl.ppo_value_loss(values.float(), old_values[idx, :T], returns[idx, :T], m, P.vf_clip,
                                                     total=n_tokens)
            loss = loss + P.vf_coef * vf_loss
            parts["loss/value"], parts["val/clipfrac"] = vf_loss.item(), vf_clipfrac * n
        if ptx is not None and not critic_only:  # PPO-ptx: keep the language-modelling ability (each rank its own rows)
            sample = random.sample(ptx, min(len(ptx), max(1, P.minibatch_size // w.size)))
            pb = D.collate(sample, tok.pad_token_id)
            logits = policy(input_ids=pb["input_ids"].to(device), attention_mask=pb["attention_mask"].to(device)).logits
            lm = sft_loss(token_logprobs(logits, pb["input_ids"].to(device)), pb["loss_mask"].to(device), int(pb["loss_mask"][:, 1:].sum()))
            loss = loss + P.ptx_coef * lm / w.size  # the ranks' shares sum to the mean of their ptx losses
            parts["loss/ptx"] = lm.item() / w.size
        parts["loss/total"] = loss.item()
        return loss, parts

    optimizer.zero_grad(set_to_none=True)
    for epoch in range(P.epochs):
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + it * 7_919 + epoch)
        parts_of_epoch = rl.minibatch_partition(n_global, P.minibatch_size, gen)
        epoch_kl = []
        for j, part in enumerate(parts_of_epoch):
            idx = torch.tensor([rows.local[g] for g in part.tolist() if g in rows.local], dtype=torch.long)
            # the minibatch's own padding only: responses cut at its longest, queries' all-padding columns gone
            mb, T = trim_padding({k: batch[k][idx] for k in keys})
            m = mask[idx, :T]
            n_tokens = w.all_sum(float(m.sum()))  # the global minibatch's real tokens: every loss's normaliser
            total = n_tokens if norm == "token" else len(part)
            last = (j + 1) % P.grad_accum == 0 or j == len(parts_of_epoch) - 1
            with w.no_sync(last):
                with autocast(device, dtype):
                    loss, parts = w.call(minibatch_loss, mb, idx, m, total, n_tokens)
                finite = not w.any(not math.isfinite(loss.item()))
                if finite:
                    w.backward(loss / P.grad_accum)
            # statistics of the global minibatch: token-weighted means, and the loss shares summed
            keys_ = sorted(parts)
            g = dict(zip(keys_, w.all_sum(torch.tensor([float(parts[k]) for k in keys_], dtype=torch.float64)).tolist()))
            ntok, global_loss = max(g.pop("tokens"), 1.0), g.pop("loss/total")
            for k, v in g.items():
                acc.setdefault(k, []).append(v if k.startswith("loss/") else v / ntok)
            if first_ratio is None:
                first_ratio = g["policy/ratio_mean"] / ntok
            epoch_kl.append(g["policy/approxkl"] / ntok)
            if not finite:  # skip this minibatch's gradient on every rank; the guard counts it
                guard.ok(float("nan"))
                optimizer.zero_grad(set_to_none=True)
                continue
            if last:
                grad_norm = w.clip_gradients(params, cfg.train.max_grad_norm)  # 0 = no clipping, as in every trainer
                if guard.ok(global_loss, grad_norm):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                acc.setdefault("train/grad_norm", []).append(float(grad_norm))
        if P.target_kl and sum(epoch_kl) / len(epoch_kl) > P.target_kl:
            acc.setdefault("policy/early_stop_epoch", []).append(epoch)
            break
    out = {k: sum(v) / len(v) for k, v in acc.items() if v}
    out["policy/ratio_first_mb"] = first_ratio
    if critic is not None:
        out["val/explained_variance"] = explained_variance(old_values, returns, mask, w.all_sum if w.size > 1 else None)
    return out


def explained_variance(values, returns, mask, all_sum=None) -> float:
    """1 - Var(R - V) / Var(R) over real tokens: 1 = perfect critic, <= 0 = no better than a constant.
    `all_sum`: over every rank's tokens (losses.rl.masked_moments)."""
    var_r = rl.masked_moments(returns.double(), mask, all_sum)[1].item()
    var_d = rl.masked_moments((returns - values).double(), mask, all_sum)[1].item()
    return float("nan") if var_r <= 0 else 1 - var_d / var_r


@torch.no_grad()
def heldout_eval(policy, tok, task, prompts, R, device, dtype, scorer, engine) -> dict:
    """Greedy responses to held-out prompts: their mean reward (`eval/score`, the proxy, scored without
    updating a running normalisation) and, where the task has a gold scorer, their mean gold (`eval/gold`);
    with a reward-model ensemble, the members' mean disagreement on them (`eval/ensemble_std`). Under a
    launcher each rank answers every W-th prompt and the sums are all-reduced."""
    w = world()
    mine = w.shard(prompts)
    load_engine(engine, policy, w)
    outs = generate(policy, tok, [p.messages for p in mine], R.max_new_tokens, temperature=0.0, batch_size=R.batch_size, engine=engine) if mine else []
    score, gold = scorer(mine, [o.text for o in outs], [o.finished for o in outs], update=False) if mine else (torch.zeros(0), [] if scorer.has_gold else None)
    n = len(prompts)
    out = {"eval/score": w.all_sum(float(score.sum())) / n}
    if gold is not None:
        out["eval/gold"] = w.all_sum(float(sum(gold))) / n
    if scorer.ensemble:
        out["eval/ensemble_std"] = w.all_sum(float(scorer.disagreement.sum()) if mine else 0.0) / n
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def warn(m: dict, ref_length: float) -> None:
    """Guards that do not stop the run but tell the user something is drifting."""
    if m["objective/kl"] > 20:
        log.warning("KL to the reference is %.1f nats per response: the policy is drifting far (raise kl_coef?)", m["objective/kl"])
    if m.get("policy/ratio_mean", 1.0) > 1.5 or m.get("policy/ratio_mean", 1.0) < 0.67:
        log.warning("PPO ratio mean %.2f is far from 1: lower the learning rate or the epochs", m["policy/ratio_mean"])
    if ref_length and not 0.5 <= m["response/length_mean"] / ref_length <= 2.0:
        log.warning("mean response length %.1f tokens vs %.1f at the start: length is drifting (reward hacking?)",
                    m["response/length_mean"], ref_length)
    if m["response/eos_rate"] < 0.2:
        log.warning("only %.0f%% of responses end with EOS: they are being truncated", 100 * m["response/eos_rate"])


def _no_dropout(model) -> None:
    """Dropout off everywhere, so train-mode forwards equal the rollout's and the first ratio is 1."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)
