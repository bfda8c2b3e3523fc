"""Direct preference methods: train the policy on preferences themselves, no reward model, no sampling.

  tether dpo --loss sigmoid|ipo|ipo_avg|hinge|robust|cdpo|simpo   pairs (prompt, chosen, rejected); simpo needs no reference
  tether kto                                                    unpaired (prompt, completion, label), or pairs unpaired
  tether orpo                                                   pairs; SFT on chosen + lam * odds-ratio loss, no reference

The loop, top to bottom: read and validate the data (held-out split by prompt, so no held-out
example shares a prompt with a training one); tokenise every example as prompt + completion with the
chat template and the loss mask on the completion only (its closing EOS included); compute the
reference log-probs once and cache them in OUT/ref_logps.safetensors (or per batch); evaluate;
optimizer steps in which chosen and rejected go through the policy in one forward; evaluate again;
write OUT/model and OUT/summary.json. The losses are the pure functions of tether.losses.preference.
Every log-prob here is a sum over a completion's tokens, with the token count alongside.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tether import data as D
from tether.config import DirectConfig
from tether.errors import TetherError
from tether.losses.preference import dpo_loss, kto_loss, log_odds, orpo_loss, simpo_loss
from tether.models import (
    autocast,
    default_device,
    load_causal_lm,
    load_policy,
    resolve_dtype,
)
from tether.rollout import scored_logprobs
from tether.distributed import world
from tether.runloop import Run, fit, micro_batch, save_model, seed_everything, training_setup

log = logging.getLogger("tether")

PAIRED = ("chosen", "rejected")  # the sequences of a pairwise example (dpo, orpo)
UNPAIRED = ("completion", "kl")  # a KTO example: its completion, and a mismatched pair for the KL estimate
CACHE = "ref_logps.safetensors"


# --------------------------------------------------------------------------------------------------
# Which method, with which settings


def with_method(cfg: DirectConfig, method: str) -> DirectConfig:
    """The config with direct.method set by the command (`tether kto`) or the recipe's kind: the
    command is the method, whatever a config file says."""
    return dataclasses.replace(cfg, direct=dataclasses.replace(cfg.direct, method=method))


def reference_free(d) -> bool:
    """SimPO and ORPO reward the policy's own per-token log-likelihood: no reference model at all."""
    return d.method == "orpo" or d.loss_type == "simpo"


def check(cfg: DirectConfig) -> DirectConfig:
    """Refuse settings that would silently train something else; fill in the method's default beta
    (so OUT/config.yaml records the beta actually used)."""
    d = cfg.direct
    if not cfg.data.path:
        raise TetherError(f"{d.method} needs preference data: --data FILE (columns prompt, chosen, rejected"
                          + ("; or prompt, completion, label)" if d.method == "kto" else ")"))
    if cfg.data.packing:
        raise TetherError("data.packing is not supported for direct preference methods")
    if d.method != "dpo" and d.loss_type != "sigmoid":
        raise TetherError(f"direct.loss_type={d.loss_type} applies to tether dpo only, not {d.method}")
    if not 0 <= d.label_smoothing < 0.5:
        raise TetherError(f"direct.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.loss_type in ("cdpo", "robust") and d.label_smoothing == 0:
        raise TetherError(f"loss_type {d.loss_type} needs direct.label_smoothing > 0 (the assumed label-flip rate, "
                          "e.g. 0.1); with 0 it is plain sigmoid DPO")
    if d.label_smoothing and (d.method != "dpo" or d.loss_type in ("hinge", "ipo", "ipo_avg")):
        raise TetherError(f"direct.label_smoothing has no meaning for {d.method if d.method != 'dpo' else d.loss_type}")
    if d.soft_labels and (d.method != "dpo" or d.loss_type not in ("sigmoid", "cdpo")):
        raise TetherError("direct.soft_labels needs tether dpo with loss_type sigmoid or cdpo")
    beta = d.beta if d.beta is not None else (2.0 if d.loss_type == "simpo" else 0.1)
    if beta <= 0 or d.lam < 0 or d.desirable_weight <= 0 or d.undesirable_weight <= 0:
        raise TetherError("direct.beta, desirable_weight and undesirable_weight must be > 0, and direct.lam >= 0")
    return dataclasses.replace(cfg, direct=dataclasses.replace(d, beta=beta))


# --------------------------------------------------------------------------------------------------
# Data: validated rows -> examples of tokenised sequences


def tokenize(tok, prompt: list[dict], completion: list[dict]) -> dict:
    """prompt + completion through the chat template; the mask is 1 exactly on the completion's
    assistant tokens (content and closing EOS), never on the prompt's, never derived from the pad id."""
    return D.tokenize_sft(tok, {"messages": prompt + completion}, first_trained=len(prompt))


def load_examples(cfg: DirectConfig, tok) -> tuple[list[dict], list[dict]]:
    d, kto = cfg.data, cfg.direct.method == "kto"
    normalise = D.normalise_unpaired if kto else D.normalise_preferences
    train, held = D.preference_splits(d, normalise, cfg.train.seed)
    out = []
    for split, source in zip((train, held), (d.path, d.eval_path or d.path)):
        examples = tokenize_examples(tok, split, ("completion",) if kto else PAIRED, d.max_length, d.overlong, source)
        if kto:
            add_mismatched(tok, examples, d.max_length, cfg.train.seed)
        out.append(examples)
    if not out[0]:
        raise TetherError(f"{d.path}: no training examples left (data.overlong={d.overlong})")
    return out[0], out[1]


def tokenize_examples(tok, items: list[dict], keys: tuple, max_length: int, overlong: str, source: str) -> list[dict]:
    """Tokenise each sequence of each example; an example over max_length is truncated, dropped or
    an error as a whole (a pair without its rejected side teaches nothing)."""
    examples, n_long = [], 0
    for it in items:
        ex = {k: v for k, v in it.items() if k not in keys}
        ex["messages"] = {k: it[k] for k in keys}  # the completions as messages (KTO pairs them with other prompts)
        for k in keys:
            ex[k] = tokenize(tok, it["prompt"], it[k])
            if sum(ex[k]["loss_mask"][1:]) == 0:
                raise TetherError(f"{source}, row {it['row']}, field '{k}': no completion tokens after tokenisation")
        longest = max(len(ex[k]["input_ids"]) for k in keys)
        if longest > max_length:
            n_long += 1
            if overlong == "error":
                raise TetherError(f"{source}, row {it['row']}: {longest} tokens, over max_length={max_length}; "
                                  "raise data.max_length or set data.overlong=truncate|drop")
            if overlong == "drop":
                continue
            for k in keys:  # keep the start: the prompt and the beginning of the completion
                ex[k] = {"input_ids": ex[k]["input_ids"][:max_length], "loss_mask": ex[k]["loss_mask"][:max_length]}
            if any(sum(ex[k]["loss_mask"][1:]) == 0 for k in keys):  # the prompt alone fills max_length
                continue
        examples.append(ex)
    if n_long:
        log.warning("%s: %d of %d examples are longer than max_length=%d tokens; policy '%s'",
                    source, n_long, len(items), max_length, overlong)
    return examples


def add_mismatched(tok, examples: list[dict], max_length: int, seed: int) -> None:
    """KTO's reference point z0 estimates KL(pi || ref) from completions the prompt did NOT ask for:
    example i gets a 'kl' sequence, its own prompt followed by the completion of a partner example
    with a different prompt. Partners come from a seeded shuffle and are fixed here, so every step
    and every resume sees the same pairs and their reference log-probs can be precomputed with the
    rest. The 'kl' sequence is only an estimate, so it is cut to max_length whatever data.overlong says."""
    n = len(examples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + n)).tolist()
    prompts = [json.dumps(e["prompt"], sort_keys=True) for e in examples]
    same = 0
    for pos, i in enumerate(order):
        # the next example in the shuffled order whose prompt differs (unpaired pairs put a prompt's
        # chosen and rejected next to each other); if every prompt is the same, the next one
        j = next((order[(pos + s) % n] for s in range(1, n) if prompts[order[(pos + s) % n]] != prompts[i]),
                 order[(pos + 1) % n])
        same += prompts[j] == prompts[i]
        t = tokenize(tok, examples[i]["prompt"], examples[j]["messages"]["completion"])
        examples[i]["kl"] = {"input_ids": t["input_ids"][:max_length], "loss_mask": t["loss_mask"][:max_length]}
        examples[i]["kl_partner"] = j
    if same:
        log.warning("KTO: %d of %d examples found no partner with another prompt; their KL estimate uses their own prompt", same, n)


# --------------------------------------------------------------------------------------------------
# Log-probabilities of completions


def sequence_logps(model, seqs: list[dict], pad_id: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each sequence's completion tokens, their counts), both (N,), from ONE
    forward over the right-padded batch. Padding is excluded by lengths and the loss mask."""
    b = D.collate(seqs, pad_id)
    ids = b["input_ids"].to(device)
    m = b["loss_mask"][:, 1:].to(device)
    with autocast(device, dtype):  # (N, T-1) in fp32: entry t-1 scores token t; the LM head on completions only
        logps = scored_logprobs(model, ids, m, attention_mask=b["attention_mask"].to(device))
    return (logps * m).sum(-1), m.sum(-1)


def policy_logps(model, items: list[dict], keys: tuple, pad_id: int, device, dtype):
    """Every sequence of `items` in one forward, rows stacked key by key (all chosen, then all
    rejected): returns (len(keys), B) summed log-probs and token counts."""
    logps, lengths = sequence_logps(model, [it[k] for k in keys for it in items], pad_id, device, dtype)
    return logps.view(len(keys), len(items)), lengths.view(len(keys), len(items))


@torch.no_grad()
def reference_logps(ref, policy, seqs: list[dict], pad_id: int, device, dtype) -> torch.Tensor:
    """Summed completion log-probs under the reference, without autograd: the frozen `ref` model, or
    with `ref` None (LoRA) the policy's own base weights with its adapter switched off."""
    if ref is None:
        with policy.disable_adapter():
            return sequence_logps(policy, seqs, pad_id, device, dtype)[0]
    return sequence_logps(ref, seqs, pad_id, device, dtype)[0]


def load_reference(cfg: DirectConfig, device):
    """The frozen reference model, or None when the LoRA policy's base serves (adapter disabled; no
    second copy of the weights). It must share the policy's tokenizer."""
    name = cfg.direct.ref_model or cfg.model.name
    if cfg.model.lora_r > 0 and name == cfg.model.name:
        return None
    ref = load_causal_lm(name, cfg.model.trust_remote_code).to(device).eval()
    ref.requires_grad_(False)
    return ref


def reference_identity(cfg: DirectConfig) -> list:
    """What the cached reference log-probs depend on besides the token ids: the reference's name and,
    for a folder, its weight files' sizes and times (a retrained folder at the same path recomputes)."""
    name = cfg.direct.ref_model or cfg.model.name
    p = Path(name).expanduser()
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin")) if p.is_dir() else []
    return [name, *[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def cache_key(cfg: DirectConfig, dtype, splits: dict[str, list[dict]], keys: tuple) -> str:
    h = hashlib.sha256(json.dumps({"reference": reference_identity(cfg), "dtype": str(dtype), "keys": keys}).encode())
    for split, examples in splits.items():
        h.update(split.encode())
        for ex in examples:
            for k in keys:
                h.update(json.dumps([ex[k]["input_ids"], ex[k]["loss_mask"]]).encode())
    return h.hexdigest()


def read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            log.info("%s: data or reference changed; recomputing the reference log-probs", path)
            return None
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@torch.no_grad()
def precompute(ref, policy, examples: list[dict], keys: tuple, batch_size: int, pad_id: int, device, dtype) -> torch.Tensor:
    """(N, len(keys)) reference log-probs of every sequence of `examples`, in length-sorted batches (under a
    launcher each rank computes every W-th batch and the table is all-reduced)."""
    w = world()
    out = torch.zeros(len(examples), len(keys))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][keys[0]]["input_ids"]))
    for b, s in enumerate(range(0, len(order), batch_size)):
        if b % w.size != w.rank:
            continue
        idx = order[s : s + batch_size]
        lp = reference_logps(ref, policy, [examples[i][k] for k in keys for i in idx], pad_id, device, dtype)
        out[idx] = lp.view(len(keys), len(idx)).T.float().cpu()
    return w.all_sum(out)


def prepare_reference(cfg: DirectConfig, run: Run, policy, splits: dict[str, list[dict]], keys: tuple, pad_id, device, dtype):
    """Reference log-probs once, before training: from OUT/ref_logps.safetensors when its key (a hash
    of every token id and mask, the reference's identity and the dtype) matches, else computed with
    the reference and written there. Each example then carries its own values under 'ref', and a full
    fine-tuning reference is freed before the policy trains. Returns the reference to keep for
    per-batch use (direct.precompute_ref=false), else None."""
    if not cfg.direct.precompute_ref:
        return load_reference(cfg, device)
    path = run.out / CACHE
    key = cache_key(cfg, dtype, splits, keys)
    table = read_cache(path, key)
    w = world()
    if w.any(table is None):
        ref = load_reference(cfg, device)
        was = policy.training
        policy.eval()
        table = {s: precompute(ref, policy, ex, keys, cfg.train.batch_size, pad_id, device, dtype) for s, ex in splits.items()}
        policy.train(was)
        if w.is_main:
            save_file(table, str(path), metadata={"key": key, "reference": cfg.direct.ref_model or cfg.model.name,
                                                  "keys": ",".join(keys)})
        w.barrier()
        del ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("reference log-probs computed for %s and cached in %s", ", ".join(f"{len(v)} {s}" for s, v in table.items()), path)
    else:
        log.info("reference log-probs read from %s", path)
    for s, examples in splits.items():
        for ex, row in zip(examples, table[s]):
            ex["ref"] = row
    return None


# --------------------------------------------------------------------------------------------------
# Losses of a micro-batch, and what is logged about them


def forward_losses(cfg: DirectConfig, model, ref, items: list[dict], pad_id: int, device, dtype, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Per-example losses of `items` (with autograd through the policy) and the detached tensors the
    metrics are computed from. Under a launcher, `items` is this rank's share of the micro-batch (`scale`
    0 for a stand-in row, tether.distributed.World.rows): KTO's z0 is then the mean over every rank's."""
    d = cfg.direct

    def ref_of(keys):  # (len(keys), B): cached on the examples, or a no-grad reference forward now
        if "ref" in items[0]:
            return torch.stack([it["ref"] for it in items], 1).to(device)
        return reference_logps(ref, model, [it[k] for k in keys for it in items], pad_id, device, dtype).view(len(keys), len(items))

    if d.method == "kto":
        logps, _ = policy_logps(model, items, ("completion",), pad_id, device, dtype)
        with torch.no_grad():  # z0 is a detached reference point: no gradient through the mismatched pairs
            kl_logps, _ = policy_logps(model, items, ("kl",), pad_id, device, dtype)
        ref_lp = ref_of(UNPAIRED)
        desirable = torch.tensor([it["label"] for it in items], device=device)
        z0 = None
        w = world()
        if w.size > 1 and model.training:  # the global micro-batch's z0 (evaluation runs whole on every rank)
            n = w.all_sum(torch.tensor([float(len(items)) * scale], dtype=torch.float64, device=device))
            total = w.all_sum((kl_logps[0] - ref_lp[1]).double().sum()[None] * scale)
            z0 = (total / n.clamp(min=1)).clamp(min=0)[0].to(logps.dtype)
        losses, rewards, z0 = kto_loss(logps[0], ref_lp[0], desirable, kl_logps[0], ref_lp[1], beta=d.beta,
                                       desirable_weight=d.desirable_weight, undesirable_weight=d.undesirable_weight, z0=z0)
        return losses, {"rewards": rewards.detach(), "logps": logps[0].detach(), "desirable": desirable,
                        "z0": z0.expand(len(items)), "beta": d.beta}

    # chosen and rejected of every pair in ONE forward: half the kernel launches, and batch-dependent
    # numerics (padding, kernels) are the same for both sides
    logps, lengths = policy_logps(model, items, PAIRED, pad_id, device, dtype)
    (pc, pr), (nc, nr) = logps, lengths
    if d.method == "orpo":
        losses, rc, rr = orpo_loss(pc, pr, nc, nr, lam=d.lam)
    elif d.loss_type == "simpo":
        losses, rc, rr = simpo_loss(pc, pr, nc, nr, beta=d.beta, gamma=d.gamma, label_smoothing=d.label_smoothing)
    else:
        ref_lp = ref_of(PAIRED)
        p = torch.tensor([1.0 if it["p_chosen"] is None else it["p_chosen"] for it in items], device=device) if d.soft_labels else None
        losses, rc, rr = dpo_loss(pc, pr, ref_lp[0], ref_lp[1], beta=d.beta, loss_type=d.loss_type,
                                  label_smoothing=d.label_smoothing, p_chosen=p, chosen_lengths=nc, rejected_lengths=nr)
    return losses, {"chosen_rewards": rc.detach(), "rejected_rewards": rr.detach(), "chosen_logps": pc.detach(),
                    "rejected_logps": pr.detach(), "chosen_lengths": nc, "rejected_lengths": nr, "orpo": d.method == "orpo"}


def metrics(outs: list[dict], prefix: str = "") -> dict:
    """TRL's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/*.
    KTO splits its unpaired examples by label; its 'accuracy' is the share on the side of z0 the loss
    pushes them to (desirable above, undesirable below), and `kl` is z0."""
    cat = {k: torch.cat([o[k] for o in outs]) for k in outs[0] if isinstance(outs[0][k], torch.Tensor)}
    m = {}
    if "desirable" in cat:
        des, r, lp, z0 = cat["desirable"], cat["rewards"], cat["logps"], cat["z0"]
        right = torch.where(des, r > outs[0]["beta"] * z0, r < outs[0]["beta"] * z0)
        m["kl"] = z0.mean()
        m["rewards/accuracies"] = right.float().mean()
        for side, sel in (("chosen", des), ("rejected", ~des)):
            if sel.any():
                m[f"rewards/{side}"], m[f"logps/{side}"] = r[sel].mean(), lp[sel].mean()
        if des.any() and (~des).any():
            m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    else:
        rc, rr = cat["chosen_rewards"], cat["rejected_rewards"]
        m = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
             "rewards/accuracies": (rc > rr).float().mean(),
             "logps/chosen": cat["chosen_logps"].mean(), "logps/rejected": cat["rejected_logps"].mean()}
        if outs[0]["orpo"]:
            a_c = cat["chosen_logps"] / cat["chosen_lengths"].clamp(min=1)
            a_r = cat["rejected_logps"] / cat["rejected_lengths"].clamp(min=1)
            m["nll_loss"] = (-a_c).mean()
            m["log_odds_ratio"] = (log_odds(a_c) - log_odds(a_r)).mean()
    return {prefix + k: float(v) for k, v in m.items()}


@torch.no_grad()
def evaluate(cfg: DirectConfig, model, ref, examples: list[dict], pad_id: int, device, dtype) -> dict:
    """eval/loss (mean per example) and the metrics above on held-out examples, dropout off."""
    was = model.training
    model.eval()
    bs, t = cfg.train.batch_size, cfg.train
    # length-sorted batches waste less padding; not for KTO, whose z0 is a batch mean (keep them mixed, as in training)
    ordered = examples if cfg.direct.method == "kto" else sorted(examples, key=lambda e: len(e["chosen"]["input_ids"]))
    losses, outs = [], []
    for b, i in enumerate(range(0, len(ordered), bs)):
        if t.eval_batches and b >= t.eval_batches:
            break
        loss, out = world().call(forward_losses, cfg, model, ref, ordered[i : i + bs], pad_id, device, dtype)
        losses.append(loss.float())
        outs.append(out)
    model.train(was)
    return {"eval/loss": torch.cat(losses).mean().item(), **metrics(outs, "eval/")}


# --------------------------------------------------------------------------------------------------
# The trainer


def train(cfg: DirectConfig, on_step=None) -> dict:
    """Train cfg.direct.method as `cfg` says. `on_step(step, run, model)` is called after each optimizer
    step (tests use it to interrupt a run). Returns the summary (status 'done' or 'interrupted')."""
    cfg = check(cfg)
    t, d = cfg.train, cfg.direct
    seed_everything(t.seed)
    device = default_device()
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, tok = load_policy(cfg.model, device, dtype)
    train_set, eval_set = load_examples(cfg, tok)
    keys = UNPAIRED if d.method == "kto" else PAIRED
    if t.verbose:
        print("example (trained tokens in [[...]]):\n" + D.describe_example(tok, train_set[0][keys[0]]), file=sys.stderr)
    if d.method == "kto":
        n_des = sum(e["label"] for e in train_set)
        ratio = d.desirable_weight * n_des / max(1e-9, d.undesirable_weight * (len(train_set) - n_des))
        if not 1.0 <= ratio <= 4 / 3:  # the paper's recommended range for w_D n_D / (w_U n_U)
            log.warning("KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = %.2f; the paper "
                        "recommends 1 to 4/3 (e.g. direct.desirable_weight=%.2f)", ratio,
                        d.undesirable_weight * (len(train_set) - n_des) / max(1, n_des))
    pad_id = tok.pad_token_id
    total_steps, steps_per_epoch, optimizer, scheduler, guard = training_setup(t, model, len(train_set))

    ref = None  # a frozen reference model kept for per-batch use; None with a cache, LoRA, or no reference

    lengths = [max(len(e[key]["input_ids"]) for key in keys) for e in train_set] if t.group_by_length else None

    w = world()

    def step_fn(step: int):
        batches = [micro_batch(train_set, k, t.batch_size, t.seed, lengths) for k in range(step * t.grad_accum, (step + 1) * t.grad_accum)]
        n = sum(len(b) for b in batches)  # the step's loss is a mean over all of its examples (every rank's), whatever the accumulation
        loss_sum, outs = 0.0, []
        for i, mb in enumerate(batches):
            items, scale = w.rows(mb)
            with w.no_sync(i == len(batches) - 1):
                losses, out = w.call(forward_losses, cfg, model, ref, items, pad_id, device, dtype, scale)
                loss = losses.sum() / n * scale
                w.backward(loss)  # (a non-finite loss still backpropagates on every rank; the step is skipped)
            loss_sum += loss.item()
            if scale:
                outs.append({k: v.cpu() if torch.is_tensor(v) else v for k, v in out.items()})
        if w.size > 1:  # the metrics of the global batch: every rank's examples
            outs = [o for rank_outs in w.gather_objects(outs) for o in rank_outs]
        n_tokens = sum(len(it[k]["input_ids"]) for b in batches for it in b for k in keys)
        return w.all_sum(loss_sum), {**metrics(outs), "train/epoch": (step + 1) / steps_per_epoch, "train/examples": n}, n_tokens

    with Run(t.out, cfg, resume=t.resume, report_to=t.report_to) as run:
        if not reference_free(d):
            ref = prepare_reference(cfg, run, model, {"train": train_set, "eval": eval_set}, keys, pad_id, device, dtype)
        start = 0
        if t.resume and run.latest_checkpoint() is not None:
            start = run.load_checkpoint(model, optimizer, scheduler, guard)["step"]
        what = d.method + (f" ({d.loss_type})" if d.method == "dpo" else "")
        log.info("%s: %d train / %d eval examples, %d steps, beta %s, reference %s, dtype %s, %d trainable params",
                 what.upper(), len(train_set), len(eval_set), total_steps, d.beta if d.method != "orpo" else "-",
                 "none" if reference_free(d) else (d.ref_model or cfg.model.name) + (" (adapter off)" if cfg.model.lora_r and not d.ref_model else ""),
                 str(dtype).replace("torch.", ""), sum(p.numel() for p in model.parameters() if p.requires_grad))
        eval_fn = (lambda: evaluate(cfg, model, ref, eval_set, pad_id, device, dtype)) if eval_set else None
        status, step, final = fit(run, t, model, optimizer, scheduler, step_fn, total_steps, start, eval_fn, on_step, guard, desc=d.method)
        if status == "interrupted":
            return {"status": status, "step": step}
        model_dir = save_model(model, tok, run, merge=cfg.model.merge)
        rows = run.read_metrics()
        last = next((m for m in reversed(rows) if "train/loss" in m), {})
        initial = next((m for m in rows if m["step"] == 0 and "eval/loss" in m), {})
        return run.finish({
            "stage": d.method, "status": "done", "steps": step, "loss_type": d.loss_type if d.method == "dpo" else d.method,
            "beta": d.beta, "reference": None if reference_free(d) else d.ref_model or cfg.model.name,
            **{k: v for k, v in last.items() if k not in ("step", "train/lr", "train/tokens_per_s")},
            **{f"{k}_initial": v for k, v in initial.items() if k in ("eval/loss", "eval/rewards/accuracies")},
            **final, "nan_skipped": guard.total, "model": str(model_dir),
            "train_examples": len(train_set), "eval_examples": len(eval_set),
        })
