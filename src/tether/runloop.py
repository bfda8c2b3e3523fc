"""What every trainer shares: the run folder, metrics, checkpoints and resume, signals, NaN guard.

A run folder OUT/ holds:
  config.yaml       the resolved config (feed it back with --config to reproduce the run)
  metrics.jsonl     one JSON object per logged step: {"step": N, "name": value, ...}
  tb/               TensorBoard events
  checkpoints/      step-00000050/ ... complete checkpoints only (written to a temp name, then renamed)
  model/            the final model, Hugging Face format (safetensors)
  summary.json      final metrics, wall time, peak memory; written last, so its presence means "done"
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from tether.config import save_config, to_dict
from tether.distributed import world
from tether.errors import TetherError, TrainingDiverged

log = logging.getLogger("tether")


RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl")  # a folder with one of these is a tether run folder


class Run:
    """A run folder plus its trackers. Use as a context manager: SIGTERM/SIGINT set `stop_requested`
    (the trainer checkpoints and exits cleanly at the end of the current step); a second Ctrl-C
    interrupts at once.

    A fresh run never mixes with what `out` held before (an old weight shard or a LoRA run's adapter/
    would otherwise survive beside the new model): it starts in a new or empty folder, or empties a
    tether run folder first. Work is never deleted unasked: a finished run (summary.json) or
    checkpoints are refused unless the config says `train.overwrite` (trainers; `overwrite` for label
    and the evaluations) or `resume` continues them, and a non-empty folder that is not a run folder is
    refused outright. `continues`: the stage continues an unfinished run by itself (label's samples),
    which is right only for the config that made it, so a folder recording another config is refused
    unless overwrite.

    Under a multi-process launch only rank 0 touches the folder (claims it, writes config, metrics,
    checkpoints, summary); the other ranks read its checkpoints to resume (a folder every node sees).
    """

    def __init__(self, out: str | Path, cfg, resume: bool = False, report_to: str = "tensorboard", continues: bool = False):
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self.t0 = time.time()
        self.stop_requested = False
        self.world = world()
        self.writes = self.world.is_main
        trainer = hasattr(cfg, "train")
        overwrite = bool(getattr(cfg.train if trainer else cfg, "overwrite", False))
        flag = "--overwrite" if trainer else "--set overwrite=true"
        if resume and overwrite:
            raise TetherError(f"{self.out}: --resume continues a run and {flag} replaces it; choose one")
        if continues and not overwrite:
            if _records_other_config(self.out, cfg):
                raise TetherError(f"{self.out} holds a run of another config (see its config.yaml): pass {flag} to "
                                  "replace it (the folder is emptied first), or choose another --out")
            resume = True
        if self.writes:
            if not resume:
                _claim_folder(self.out, overwrite, trainer, flag)
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.world.barrier()  # the other ranks look for checkpoints only once rank 0 has claimed the folder
        self.start_step = 0
        self._tb = None
        self._ext = None
        self.report_to = report_to
        self._cfg = cfg
        self._old_handlers: dict = {}

    # --- signals ------------------------------------------------------------------------------
    def __enter__(self):
        def handler(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            print(f"\ntether: {signal.Signals(signum).name} received; checkpointing after this step "
                  "(Ctrl-C again to abort now)", file=sys.stderr)

        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread (e.g. inside a server); no graceful stop there
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        if self._tb is not None:
            self._tb.close()
        if self._ext is not None and self.report_to == "wandb":
            self._ext.finish()
        elif self._ext is not None and self.report_to == "mlflow":
            self._ext.end_run()
        return False

    # --- metrics ------------------------------------------------------------------------------
    def _trackers(self):
        if self._tb is None and self.report_to != "none" and self.writes:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resumed from
            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=self.start_step + 1 if self.start_step else None)
            if self.report_to in ("wandb", "mlflow"):
                self._ext = _external_tracker(self.report_to, self.out, self._cfg)

    def log(self, step: int, metrics: dict) -> None:
        if not self.writes:
            return
        metrics = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._trackers()
        for k, v in metrics.items():
            if isinstance(v, float) and self._tb is not None:
                self._tb.add_scalar(k, v, step)
        if self._ext is not None:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
            if self.report_to == "wandb":
                self._ext.log(scalars, step=step)
            else:
                self._ext.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Free text (e.g. a markdown table of samples) for TensorBoard's text tab."""
        self._trackers()
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def read_metrics(self) -> list[dict]:
        """The metrics logged so far; [] on ranks other than 0 (rank 0 may be appending to the file)."""
        if not self.writes:
            return []
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def finish(self, summary: dict) -> dict:
        summary = {
            **summary,
            "wall_time_s": round(time.time() - self.t0, 2),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            **({"world_size": self.world.size} if self.world.size > 1 else {}),
        }
        if self.world.size > 1:  # every rank returns rank 0's summary (the others read no metrics: read_metrics)
            summary = self.world.gather_objects(summary)[0]
        if not self.writes:
            return summary
        _atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    # --- checkpoints --------------------------------------------------------------------------
    def should_stop(self) -> bool:
        """Whether a signal asked any rank to stop (all ranks then checkpoint and stop at the same step)."""
        self.stop_requested = self.world.any(self.stop_requested)
        return self.stop_requested

    def save_checkpoint(self, step: int, model, optimizer, scheduler, progress: dict, keep: int = 2) -> Path:
        """Everything needed to continue bit-exactly: trainable weights, optimizer, scheduler, RNG (every
        rank's). Every rank calls it; rank 0 writes."""
        if self.world.kind == "DEEPSPEED":  # its optimizer state lives in DeepSpeed's own partitions
            if not getattr(self, "_warned_ds", False):
                log.warning("no checkpoints under DeepSpeed yet (its partitioned optimizer state is not gathered): "
                            "the run cannot be resumed; use src/tether/launch/fsdp2.yaml for resumable sharded runs")
                self._warned_ds = True
            return self.ckpt_dir / f"step-{step:08d}"
        rng = self.world.gather_objects(rng_state())
        weights, optim = self.world.checkpoint_state(model, optimizer)  # gathered from the shards under FSDP
        final = self.ckpt_dir / f"step-{step:08d}"
        if not self.writes:
            self.world.barrier()
            return final
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_dir / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optim,
                "scheduler": scheduler.state_dict(),
                "rng": rng[0],
                **({"rng_per_rank": rng} if len(rng) > 1 else {}),
            },
            tmp / "state.pt",
        )
        (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}, indent=2))
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(self.ckpt_dir.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / "progress.json").exists())
        return done[-1] if done else None

    def load_checkpoint(self, model, optimizer, scheduler, guard: NanGuard | None = None) -> dict:
        """Restore the newest complete checkpoint; returns its progress dict (with 'step')."""
        path = self.latest_checkpoint()
        if path is None:
            raise TetherError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        if self.world.kind == "DEEPSPEED":
            raise TetherError("--resume under DeepSpeed is not supported yet: its partitioned optimizer state is not "
                              "checkpointed; the FSDP2 config (src/tether/launch/fsdp2.yaml) shards and resumes")
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing or any(n not in params for n in weights):
            raise TetherError(f"{path}: checkpoint does not match the model (different model or LoRA settings?)")
        state = torch.load(path / "state.pt", weights_only=True)
        self.world.load_checkpoint_state(model, optimizer, weights, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank", [state["rng"]])
        # each rank continues its own random stream; on another world size, rank 0's (tether's data order
        # and sampling derive from the seed and the step, not from these streams)
        set_rng_state(per_rank[self.world.rank] if len(per_rank) == self.world.size else state["rng"])
        progress = json.loads((path / "progress.json").read_text())
        self.start_step = progress["step"]
        if guard is not None:
            guard.total = progress.get("nan_skipped", 0)
        if self.writes:
            _truncate_metrics(self.out / "metrics.jsonl", self.start_step)
        log.info("resumed from %s", path)
        return progress


def _claim_folder(out: Path, overwrite: bool, trainer: bool, flag: str) -> None:
    """Make `out` ready for a fresh run (the rules are in `Run`'s docstring); every refusal comes
    before anything is deleted."""
    if out.exists() and not out.is_dir():
        raise TetherError(f"{out} is a file, not a folder: choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not any((out / m).exists() for m in RUN_MARKERS):
        raise TetherError(f"{out} is not empty and is not a tether run folder (it has no {', '.join(RUN_MARKERS)}): "
                          "choose a new or empty --out (tether never writes into or empties other folders)")
    if not overwrite and (out / "summary.json").exists():
        options = (f"--resume to continue it, {flag}" if trainer else flag) + " to replace it (the folder is emptied first)"
        raise TetherError(f"{out} holds a finished run: pass {options}, or choose another --out")
    if not overwrite and any((out / "checkpoints").glob("step-*")):
        raise TetherError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, {flag} to start over "
                          "(the folder is emptied first), or choose another --out")
    for p in out.iterdir():  # an overwritten run, or an unfinished one with nothing to resume
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _records_other_config(out: Path, cfg) -> bool:
    """Whether OUT/config.yaml records a config other than `cfg` (the `overwrite` switch aside)."""
    path = out / "config.yaml"
    if not path.is_file():
        return False
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return True
    current = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))  # the same types as a saved config
    return {k: v for k, v in saved.items() if k != "overwrite"} != {k: v for k, v in current.items() if k != "overwrite"}


# --------------------------------------------------------------------------------------------------
# Guards, schedules, helpers


class NanGuard:
    """Skip steps whose loss or gradient norm is not finite; stop after `limit` in a row.

    A NaN that reaches optimizer.step() poisons Adam's moments and every weight after it; skipping
    the update keeps the weights as they were, and the run stops before it wastes hours.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def ok(self, *values: torch.Tensor | float) -> bool:
        if all(math.isfinite(float(v)) for v in values):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite loss or gradient: update skipped (%d in a row, %d in all)", self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.in_a_row} non-finite steps in a row (train.max_nan_skips={self.limit}); "
                "stopping. Lower the learning rate, or resume from the last checkpoint."
            )
        return False


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, forget metrics a crashed run logged past the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    _atomic_write_text(path, "".join(line + "\n" for line in keep))


def _external_tracker(kind: str, out: Path, cfg):
    from tether.config import to_dict

    try:
        if kind == "wandb":
            import wandb

            return wandb.init(project="tether", name=out.name, dir=str(out), config=to_dict(cfg))
        import mlflow

        mlflow.start_run(run_name=out.name)
        return mlflow
    except ImportError:
        raise TetherError(f"--report-to {kind}: the '{kind}' package is not installed (pip install {kind})") from None


# --------------------------------------------------------------------------------------------------
# The optimisation loop every gradient-based stage shares


def make_optimizer(params: list, lr: float, weight_decay: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: decaying norms and biases hurts, and papers don't."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, eps=eps)


def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` and return the norm before clipping.
    `max_norm <= 0` means no clipping (the norm is still measured, for logging and the NaN guard):
    one meaning for `train.max_grad_norm` in every trainer."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def training_setup(t, model, n_items: int):
    """Step budget, optimizer, LR schedule and NaN guard for `n_items` training items (examples, or
    prompt groups for reward models); under a launcher the model is wrapped for the engine here
    (tether.distributed). Returns (total_steps, steps_per_epoch, optimizer, scheduler, guard)."""
    w = world()
    w.check_divisible(t.batch_size, "train.batch_size")
    steps_per_epoch = max(1, math.ceil(n_items / t.batch_size) // t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], t.lr, t.weight_decay)
    optimizer = w.prepare({"model": model}, optimizer)  # DDP / FSDP / DeepSpeed under a launcher; as is otherwise
    scheduler = make_scheduler(optimizer, t.schedule, t.warmup_steps, total_steps)
    return total_steps, steps_per_epoch, optimizer, scheduler, NanGuard(t.max_nan_skips)


def micro_batch(items: list, k: int, batch_size: int, seed: int, lengths: list[int] | None = None, window: int = 16) -> list:
    """The k-th micro-batch of the whole run. Each epoch is a fresh seeded permutation, so the data
    position is a pure function of k: resuming at step s simply continues at k = s * grad_accum.

    With `lengths` (group_by_length, as Hugging Face Trainer's): the epoch's shuffled order is cut into
    windows of `window` micro-batches, each window sorted by length, and the epoch's micro-batches then
    run in a shuffled order, so a micro-batch holds examples of similar length (little padding) while
    the order stays random."""
    per_epoch = math.ceil(len(items) / batch_size)
    epoch, i = divmod(k, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(items), generator=g).tolist()
    if lengths is not None:
        w = window * batch_size
        order = [j for s in range(0, len(order), w) for j in sorted(order[s : s + w], key=lambda j: -lengths[j])]
        i = int(torch.randperm(per_epoch, generator=g)[i])
    return [items[j] for j in order[i * batch_size : (i + 1) * batch_size]]


def fit(run: Run, t, model, optimizer, scheduler, step_fn, total_steps: int, start_step: int = 0,
        eval_fn=None, on_step=None, guard: NanGuard | None = None, desc: str = "train") -> tuple[str, int, dict]:
    """Optimizer steps from `start_step` to `total_steps`, between two evaluations.

    step_fn(step) runs forward and backward over the step's micro-batches (this rank's shard of them,
    backward through `World.backward`) and returns (loss, metrics, n_tokens) of the GLOBAL batch; a
    non-finite loss means "do not step" (the same decision on every rank: the loss and the gradient
    norm are global). This loop owns what every
    trainer needs around that: NaN guard, gradient clipping, the LR schedule, metrics and the progress
    bar, periodic evaluation (eval_fn() -> metrics), the `on_step(step, run, model)` hook, periodic
    and on-signal checkpoints. A fresh run is evaluated before its first step; a finished one after its
    last, and its final checkpoint is saved. Returns ('done' | 'interrupted', last step, final eval metrics).
    """
    from tqdm.auto import tqdm

    guard = guard or NanGuard(t.max_nan_skips)
    if start_step == 0 and eval_fn is not None:
        run.log(0, eval_fn())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True, disable=not run.writes,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)
    step, status = start_step, "done"
    try:
        while step < total_steps:
            t0 = time.time()
            optimizer.zero_grad(set_to_none=True)
            loss, metrics, n_tokens = step_fn(step)
            grad_norm = run.world.clip_gradients(params, t.max_grad_norm)
            if guard.ok(loss, grad_norm):
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            dt = time.time() - t0
            if step % t.log_every == 0 or step == total_steps:
                run.log(step, {"train/loss": loss, **metrics, "train/grad_norm": float(grad_norm), "train/lr": lr,
                               "train/tokens_per_s": n_tokens / dt, "train/nan_skipped": guard.total})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{n_tokens / dt:.0f}", refresh=False)
            bar.update(1)
            if eval_fn is not None and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                run.log(step, eval_fn())
                model.train()
            if on_step is not None:
                on_step(step, run, model)
            if run.should_stop() or (t.save_every and step % t.save_every == 0 and step < total_steps):
                run.save_checkpoint(step, model, optimizer, scheduler, {"nan_skipped": guard.total}, t.keep_checkpoints)
            if run.stop_requested:
                status = "interrupted"
                print(f"tether: stopped at step {step}/{total_steps}; checkpoint saved. Continue with --resume.", file=sys.stderr)
                break
    finally:
        bar.close()
    if status == "interrupted":
        return status, step, {}
    final = eval_fn() if eval_fn is not None else {}
    if final:
        run.log(step, final)
    run.save_checkpoint(step, model, optimizer, scheduler, {"nan_skipped": guard.total}, t.keep_checkpoints)
    return status, step, final


def save_model(model, tokenizer, run: Run, merge: bool = True, model_dir: Path | None = None, folder: Path | None = None) -> Path:
    """OUT/model (or `model_dir`) in Hugging Face format, written by rank 0 (tether.models.save_pretrained);
    under FSDP / ZeRO-3 every rank takes part in gathering the full weights first. `folder` replaces
    run.out as the parent (OUT/best). Returns the model folder."""
    from tether.models import save_pretrained

    w = run.world
    parent = run.out if folder is None else folder
    target = parent / "model" if model_dir is None else Path(model_dir)
    if w.sharded():
        full = w.full_state_dict(model)
        if w.is_main:
            save_pretrained(model, tokenizer, parent, merge=merge, model_dir=model_dir, state_dict=full)
    elif w.is_main:
        save_pretrained(model, tokenizer, parent, merge=merge, model_dir=model_dir)
    w.barrier()
    return target
