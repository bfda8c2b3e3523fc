"""vLLM as the rollout engine (optional: `pip install "tether[vllm]"`, CUDA only), behind the interface
of tether.engine.Engine: `generate(prompt_ids, ...) -> Rollout` and `load_weights(model)`.

Colocated, as TRL's colocate mode and verl do: every training rank holds its own `vllm.LLM` on its own GPU
(tensor parallel 1, vLLM's `external_launcher` backend under torchrun / accelerate, so vLLM joins the
process group the launcher made instead of starting its own). After each optimizer update the policy's
current weights (LoRA merged) are pushed into vLLM's model in place; with sleep mode vLLM frees its KV
cache and offloads its weights while the trainer runs, and wakes before the next rollout.

vLLM samples with its own kernels and precision, so its log-probs of the tokens it sampled differ from the
trainer's; PPO logs that gap every iteration (`rollout/engine_logp_gap`, `rollout/engine_kl`) and corrects
the policy gradient with truncated importance sampling (losses.rl.truncated_importance_weights,
`rollout.tis_cap`). The Hugging Face engine (tether.engine) stays the default and the CPU path.
"""

from __future__ import annotations

import logging
import os

import torch

from tether.engine import Rollout, merged_state_dict
from tether.errors import TetherError

log = logging.getLogger("tether")


def check_available() -> None:
    """Clear errors for the two launches that cannot work: no vLLM, or no CUDA GPU."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise TetherError("rollout.engine=vllm needs vLLM: pip install \"tether[vllm]\" (CUDA GPUs only); "
                          "or use rollout.engine=hf, the default") from None
    if not torch.cuda.is_available():
        raise TetherError("rollout.engine=vllm needs a CUDA GPU (vLLM does not run on this machine's CPU); "
                          "use rollout.engine=hf, the default")


class VLLMEngine:
    """Sampling with a colocated `vllm.LLM` (see the module docstring)."""

    def __init__(self, model, tok, source: str, dtype: torch.dtype, gpu_memory_utilization: float = 0.3,
                 sleep: bool = True, max_model_len: int = 4096, seed: int = 0):
        check_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights pushed in place
        from vllm import LLM

        from tether.distributed import world

        w = world()
        self.tok, self.sleeping, self.use_sleep = tok, False, sleep
        kwargs = dict(model=source, tokenizer=source, dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
                      gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep, max_model_len=max_model_len,
                      seed=seed + w.rank, tensor_parallel_size=1, enable_prefix_caching=True)
        if w.size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank, in the launcher's group
        try:
            self.llm = LLM(**kwargs, logprobs_mode="processed_logprobs")  # log-probs after temperature: the sampling distribution's
            self.processed = True
        except TypeError:  # vLLM before 0.10.2: raw log-probs; rescaled by the caller's temperature is not possible
            self.llm = LLM(**kwargs)
            self.processed = False
            log.warning("this vLLM returns log-probs before temperature scaling: the engine/trainer gap is then "
                        "measured at temperature 1 only; upgrade vLLM (>= 0.10.2) for processed log-probs")
        self.load_weights(model)

    def _model(self):
        executor = self.llm.llm_engine.model_executor
        worker = getattr(executor.driver_worker, "worker", executor.driver_worker)
        return worker.model_runner.model

    @torch.no_grad()
    def load_weights(self, model, state: dict | None = None) -> None:
        """Push the policy's current (LoRA-merged) weights into vLLM's model, in place (`state`: already gathered)."""
        self.wake()
        state = state if state is not None else merged_state_dict(model)
        self._model().load_weights(weights=((k, v) for k, v in state.items()))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sleep(self) -> None:
        """Free the KV cache and offload the weights (level 1) while the trainer uses the GPU."""
        if self.use_sleep and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 batch_size: int = 64, min_new_tokens: int = 0, progress=None, seeds: list[int] | None = None) -> Rollout:
        """As Engine.generate; vLLM schedules the batches itself (batch_size is its concern, not ours). With
        `seeds` each request samples from its own seeded stream (vLLM's per-request seed)."""
        from vllm import SamplingParams

        self.wake()
        eos = self.tok.eos_token_id
        params = [SamplingParams(max_tokens=max_new_tokens, min_tokens=min_new_tokens, temperature=temperature,
                                 top_p=top_p if temperature > 0 else 1.0, logprobs=0, stop_token_ids=[eos],
                                 seed=None if seeds is None else int(seeds[i]))
                  for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        ids, lps, finished = [], [], []
        for o in outs:
            c = o.outputs[0]
            r = list(c.token_ids)
            lp = [float(d[t].logprob) for t, d in zip(r, c.logprobs)] if c.logprobs else [0.0] * len(r)
            done = c.finish_reason == "stop" and bool(r) and r[-1] == eos
            ids.append(r)
            lps.append(lp)
            finished.append(done)
        if progress is not None:
            progress(len(prompt_ids))
        self.sleep()
        return Rollout(ids, lps, finished)
