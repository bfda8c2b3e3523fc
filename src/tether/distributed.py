"""Data parallelism on the field's engines: every trainer runs under `accelerate launch` or `torchrun`
(DDP over gloo on CPUs or NCCL on GPUs; FSDP2 and DeepSpeed ZeRO through an accelerate config file).

accelerate and torch.distributed do the work. What tether decides is small, and all of it is here:

  - `train.batch_size` is the GLOBAL micro-batch: rank r of W reads rows r, r + W, r + 2W, ... of every
    micro-batch (`World.shard`), so a run's data, and with it its result, does not depend on W;
  - the loss a rank backpropagates is its share of the global-batch loss: a sum over its own rows
    divided by the global count (an all-reduced normaliser), times W, because DDP, FSDP and DeepSpeed
    average gradients over ranks (`World.backward`); the gradient is then the single-process one;
  - statistics over a batch (token counts, whitening, baselines, the KL controller's input, every logged
    metric) are sums and counts all-reduced over ranks (`World.all_sum`);
  - only rank 0 writes files (tether.runloop.Run); every rank reads the checkpoint to resume.

Every gradient-carrying forward goes through `World.call(fn, ...)`: the trained modules sit in one
`Trained` container whose forward runs `fn`, so the engine's wrapper (DDP's reducer, FSDP's unsharding,
DeepSpeed's hooks) sees each forward even though tether's forwards call a model's backbone and LM head
separately (the head runs on the scored tokens only).

A single process (no launcher) uses none of this: no process group, no wrapper, the same code path.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import torch

from tether.errors import TetherError


def launched() -> bool:
    """True under a multi-process launcher (torchrun / accelerate launch set WORLD_SIZE) or an accelerate
    config asking for FSDP or DeepSpeed (which accelerate also runs with one process)."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1
            or _env_true("ACCELERATE_USE_FSDP") or _env_true("ACCELERATE_USE_DEEPSPEED"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


class Trained(torch.nn.Module):
    """The modules one optimizer trains, as a single module whose forward runs a function:
    `trained(fn, *args)` is `fn(*args)`, seen by the engine's wrapper as this module's forward."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleDict(modules)
        # FSDP's auto-wrap reads the decoder-layer classes from here (each Hugging Face model names its own)
        self._no_split_modules = sorted({c for m in modules.values() for sub in m.modules()
                                         for c in (getattr(sub, "_no_split_modules", None) or [])})

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


class World:
    """The process group as tether sees it: rank, size, device, and the few collectives it needs.
    `World()` in a plain process is rank 0 of 1 and every method is the identity."""

    def __init__(self):
        self.accelerator = None
        self.rank, self.size, self.local_rank = 0, 1, 0
        self.wrapped = None
        if launched():
            self.accelerator = _accelerator()
            self.rank = self.accelerator.process_index
            self.size = self.accelerator.num_processes
            self.local_rank = self.accelerator.local_process_index
        self.is_main = self.rank == 0
        self.kind = str(self.accelerator.distributed_type).split(".")[-1] if self.accelerator else "NO"
        if _env_true("ACCELERATE_USE_FSDP"):
            # FSDP2 through torch's own fully_shard (the API accelerate wraps): the same code on CUDA (NCCL)
            # and on CPUs (gloo), where accelerate itself would fall back to DDP
            if os.environ.get("FSDP_VERSION", "2") != "2":
                raise TetherError("tether supports FSDP2 only (fsdp_version: 2 in the accelerate config; "
                                  "src/tether/launch/fsdp2.yaml)")
            self.kind = "FSDP"

    # ---- the global batch ---------------------------------------------------------------------
    def check_divisible(self, n: int, what: str) -> None:
        """Refuse a global batch that does not split evenly over the ranks (each rank must hold the same
        number of rows, or the gradient average would weigh ranks unequally)."""
        if n % self.size:
            raise TetherError(f"{what}={n} is not divisible by the world size {self.size}: it is the global batch, "
                              f"split evenly over the processes; use a multiple of {self.size}")

    def shard(self, items: list) -> list:
        """This rank's rows of a global batch: rows rank, rank + W, ... (interleaved, so length-sorted
        batches give every rank a similar share of the tokens)."""
        return items[self.rank :: self.size] if self.size > 1 else items

    def rows(self, items: list) -> tuple[list, float]:
        """(this rank's rows of a global micro-batch, 1.0), or, when the micro-batch has fewer rows than
        ranks (an epoch's last), (its first row, 0.0): a stand-in whose loss is multiplied by 0, so every
        rank still runs the forward and backward the gradient all-reduce waits for."""
        mine = self.shard(items)
        return (mine, 1.0) if mine else (items[:1], 0.0)

    # ---- collectives --------------------------------------------------------------------------
    def all_sum(self, x):
        """Sum over ranks of a tensor (returned as a tensor) or a number (returned as a float)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        t = torch.as_tensor(x, dtype=torch.float64, device=self.comm_device).clone() if not torch.is_tensor(x) \
            else x.detach().to(self.comm_device).clone()
        dist.all_reduce(t)
        return float(t) if not torch.is_tensor(x) else t.to(x.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank (a stop request, a non-finite loss)."""
        return bool(self.all_sum(float(bool(flag))) > 0) if self.size > 1 else bool(flag)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rank-ordered concatenation (dim 0) of an equally shaped tensor from every rank."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        t = x.detach().to(self.comm_device).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t)
        return torch.cat(parts).to(x.device)

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects: RNG states)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def close(self, wait: bool = True) -> None:
        """End of the command: wait for every rank (`wait`: a run that finished or stopped; not after an
        error, when the others may be elsewhere), then tear the process group down. A process that exits
        with the group alive can abort (SIGABRT) while gloo's worker threads are destroyed at interpreter exit."""
        if self.accelerator is None:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                if wait:
                    dist.barrier()
            finally:
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        """Where collectives run: the rank's GPU under NCCL, else the CPU (gloo)."""
        if self.size > 1:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- training -----------------------------------------------------------------------------
    def prepare(self, modules: dict[str, torch.nn.Module], optimizer, unused: bool = False):
        """Wrap the trained modules for the engine (DDP, FSDP2 or DeepSpeed as the launch configured;
        nothing in one plain process). `unused`: some steps leave some trained parameters out (DDP then
        looks for them after each forward). Returns the optimizer to step (accelerate's wrapper when launched)."""
        self.trained = Trained(modules)
        if self.accelerator is None:
            self.wrapped = self.trained
            return optimizer
        if self.kind == "FSDP":
            return self._fully_shard(optimizer)
        self.accelerator.free_memory()  # drop the previous trainer's wrappers (an ensemble trains its members in turn)
        self.accelerator.ddp_handler.find_unused_parameters = unused
        self.wrapped, optimizer = self.accelerator.prepare(self.trained, optimizer)
        return optimizer

    def _fully_shard(self, optimizer):
        """FSDP2: each decoder layer (the classes the models name in _no_split_modules) a shard group, the
        rest (embeddings, final norm, heads) the root's; the optimizer is rebuilt on the sharded
        parameters (fully_shard replaces them), group by group."""
        if any(hasattr(m, "peft_config") for m in self.trained.parts.values()):
            raise TetherError("LoRA under FSDP is not supported: LoRA's frozen base fits one device, so launch it "
                              "with the DDP config (src/tether/launch/ddp.yaml)")
        names = {id(p): n for n, p in self.trained.named_parameters()}
        _shard(self.trained)
        self.wrapped = self.trained
        now = dict(self.trained.named_parameters())
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [now[names[id(p)]] for p in g["params"]]}
                  for g in optimizer.param_groups]
        return type(optimizer)(groups)  # (every group carries its own hyper-parameters)

    def frozen(self, modules: dict[str, torch.nn.Module]):
        """A caller for frozen models (PPO's reference): under FSDP they are sharded like the trained ones and
        `caller(fn, *args)` runs fn as their container's forward (every rank, in step); otherwise fn(*args)."""
        if self.kind != "FSDP":
            return lambda fn, *args, **kwargs: fn(*args, **kwargs)
        box = Trained(modules)
        _shard(box)
        return box

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) as the forward of the wrapped trained modules (see the module docstring)."""
        if self.wrapped is None or self.accelerator is None:
            return fn(*args, **kwargs)
        return self.wrapped(fn, *args, **kwargs)

    def no_sync(self, sync: bool):
        """Gradient accumulation: skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) for all but
        the last micro-batch of a step; the gradients accumulate locally until then."""
        if sync or self.accelerator is None:
            return contextlib.nullcontext()
        if hasattr(self.wrapped, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(self.wrapped)
        return self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate this rank's share of the global loss; the engines average gradients over ranks,
        so the share is scaled by W and the averaged gradient is the single-process one."""
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss * self.size)

    def clip_gradients(self, params: list, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (all shards under FSDP); 0 = measure only. Returns the norm before clipping."""
        limit = max_norm if max_norm > 0 else float("inf")
        if self.kind != "DEEPSPEED":  # DDP: every rank holds the averaged gradient; FSDP: the norm of the sharded DTensors
            norm = torch.nn.utils.clip_grad_norm_(params, limit)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # DeepSpeed clips by its own config (gradient_clipping) inside its step; report the norm it measured
        norm = getattr(self.wrapped, "get_global_grad_norm", lambda: None)()
        return torch.as_tensor(float(norm) if norm is not None else 0.0)

    def full_state_dict(self, module: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """The full (unsharded) state dict of `module`, on rank 0 (None elsewhere; on every rank with
        `everywhere`, for rollout engines). Every rank must call it under FSDP / ZeRO-3, whose parameters
        are spread over the ranks."""
        if self.kind == "DEEPSPEED":  # accelerate gathers ZeRO-3's partitions (zero3_save_16bit_model in the config)
            sd = self.accelerator.get_state_dict(self.wrapped)
            name = next(k for k, m in self.trained.parts.items() if m is module)
            sd = {k[len(f"parts.{name}."):]: v for k, v in (sd or {}).items() if k.startswith(f"parts.{name}.")}
            return sd if self.is_main or everywhere else None
        if self.kind == "FSDP":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
            return sd if self.is_main or everywhere else None
        return module.state_dict() if self.is_main or everywhere else None

    def sharded(self) -> bool:
        return self.kind in ("FSDP", "DEEPSPEED")

    def checkpoint_state(self, model, optimizer) -> tuple[dict | None, dict | None]:
        """(trainable weights, optimizer state) for a checkpoint, full (gathered) under FSDP; on rank 0."""
        if self.kind != "FSDP":
            return ({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                    optimizer.state_dict())
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=full)
        optim = get_optimizer_state_dict(self.trained, optimizer, options=full)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return ({n: t.contiguous() for n, t in weights.items() if n in trainable}, optim) if self.is_main else (None, None)

    def load_checkpoint_state(self, model, optimizer, weights: dict, optim: dict) -> None:
        """Restore what `checkpoint_state` saved (every rank reads the same files; FSDP shards them again)."""
        if self.kind != "FSDP":
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in weights.items():
                    params[n].copy_(t)
            optimizer.load_state_dict(optim)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(self.trained, optimizer, optim_state_dict=optim, options=full)

    def lockstep(self, items: list, batch_size: int) -> list[tuple[list, float]]:
        """This rank's share of `items` (every W-th) in batches, as (rows, weight) pairs, the same number on
        every rank: a rank with fewer rows gets stand-in batches of weight 0. Sharded forwards (FSDP) gather
        parameters collectively, so every rank must run as many of them."""
        mine = self.shard(items)
        n = -(-(-(-len(items) // self.size)) // batch_size)  # batches of the largest share
        out = [(mine[i * batch_size : (i + 1) * batch_size], 1.0) for i in range(n)]
        return [(rows, 1.0) if rows else (items[:1], 0.0) for rows, _ in out]


def _shard(box: Trained) -> None:
    """FSDP2 over a container: each decoder layer its own shard group, then the rest as the root's, with the
    launch's options (accelerate's FSDP_* environment: reshard after forward, CPU offload)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kw = {"reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")}
    if _env_true("FSDP_OFFLOAD_PARAMS"):
        kw["offload_policy"] = CPUOffloadPolicy()
    layers = set(box._no_split_modules)
    for m in list(box.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, **kw)
    fully_shard(box, **kw)


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _accelerator():
    """accelerate's Accelerator for this launch, with clear errors for the launches that cannot work."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
            raise TetherError(f"this launch asks for DeepSpeed (ZeRO stage {stage}) but the 'deepspeed' package is not "
                              "installed: pip install deepspeed (it needs CUDA), or launch with the DDP or FSDP config "
                              "(src/tether/launch/)") from None
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # (find_unused_parameters is set per trainer in World.prepare)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[DistributedDataParallelKwargs()])


@lru_cache(maxsize=1)
def world() -> World:
    """The process's World (one per process; the process group is created on first use)."""
    return World()
