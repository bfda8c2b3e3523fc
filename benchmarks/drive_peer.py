"""The peer side of one benchmark run, in its own process (bench.py measures its wall time and peak RSS).

    benchmarks/.venv-trl/bin/python   benchmarks/drive_peer.py RESULT.json sft|rm|dpo|kto|grpo SPEC.json   # TRL, current
    benchmarks/.venv-trl19/bin/python benchmarks/drive_peer.py RESULT.json ppo SPEC.json                 # TRL 1.9.x
    .venv/bin/python                  benchmarks/drive_peer.py RESULT.json generate SPEC.json            # plain transformers

Each mode is what a TRL user writes: a config, a trainer built from the model folder (loaded in fp32,
as tether trains; bf16 is autocast through `bf16=True`), `train()`, `save_model()` (tether writes its
model too). SPEC.json carries the same data files, batch sizes, lengths and step counts bench.py gives
tether. A callback records when each optimizer step ended (TRL's `on_step_end`; PPO: each update),
from which bench.py takes steady-state step times. Settings where TRL's defaults differ from tether's
and would change the work done are set alike, as bench.py's docstring lists (gradient checkpointing
off, no evaluation, reference log-probs precomputed for DPO and KTO, no checkpoints).

`generate` is the rollout row's reference: plain `model.generate` (sampling at T=1, no top-k/top-p)
under bf16 autocast, `min_new_tokens` = `max_new_tokens`, so every row generates the whole budget.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_timer():
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        ends: list[float] = []
        lengths: list[float] = []  # GRPO: mean completion length per step, to check the work is alike

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    return StepEnds()


def common(spec: dict) -> dict:
    """TrainingArguments shared by every TRL row, matched to tether's defaults."""
    import torch

    return dict(use_cpu=not torch.cuda.is_available(),
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=spec.get("grad_accum", 1),
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, bf16=spec["bf16"], gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", seed=0,
    )


def train(mode: str, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    timer = step_timer()
    init = {"dtype": torch.float32}
    model = spec["model"]
    if mode == "ppo":
        return train_ppo(spec, timer)
    tok = AutoTokenizer.from_pretrained(model)
    data = Dataset.from_list(read_jsonl(spec["data"]))
    if mode == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common(spec), max_length=spec["max_length"], packing=False, model_init_kwargs=init)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    elif mode == "rm":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common(spec), max_length=spec["max_length"], model_init_kwargs=init)
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    elif mode == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common(spec), max_length=spec["max_length"], beta=0.1, precompute_ref_log_probs=True,
                         model_init_kwargs=init)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    elif mode == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common(spec), max_length=spec["max_length"], beta=0.1, precompute_ref_log_probs=True,
                         model_init_kwargs=init)
        trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    elif mode == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        from bench_reward import score

        def reward(prompts, completions, **kwargs):
            return [score(p[-1]["content"], c[-1]["content"]) for p, c in zip(prompts, completions)]

        args = GRPOConfig(**common(spec), num_generations=spec["group"], max_completion_length=spec["new_tokens"],
                          beta=spec["kl_coef"], temperature=1.0, top_p=1.0, top_k=0, model_init_kwargs=init)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                              callbacks=[timer])
    else:
        raise SystemExit(f"unknown mode {mode}")
    trainer.train()
    trainer.save_model()
    return {"rc": 0, "step_ends": timer.ends, "response_lengths": timer.lengths, "threads": torch.get_num_threads()}


def train_ppo(spec: dict, timer) -> dict:
    """TRL 1.9.x experimental PPO with tether's PPO settings: policy, reference, reward model and a value
    model initialised from the reward model, all full fine-tuning; one update = `prompts_per_step` prompts,
    `epochs` passes in micro-batches of `batch`, accumulated into one optimizer step per pass (what TRL does)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["rm"], padding_side="left")  # the reward tokenizer: pad != EOS
    rows = [tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
            for r in read_jsonl(spec["data"])]
    data = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    f32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], **f32)
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], **f32)
    rm = AutoModelForSequenceClassification.from_pretrained(spec["rm"], num_labels=1, **f32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm"], num_labels=1, **f32)
    c = common(spec)
    c.pop("max_steps"), c.pop("eval_strategy")
    c["gradient_accumulation_steps"] = spec["prompts_per_step"] // spec["batch"]
    args = PPOConfig(**c, num_mini_batches=1, num_ppo_epochs=spec["epochs"],
                     total_episodes=spec["prompts_per_step"] * spec["steps"], response_length=spec["new_tokens"],
                     local_rollout_forward_batch_size=spec["prompts_per_step"], stop_token="eos", missing_eos_penalty=1.0,
                     kl_coef=spec["kl_coef"], temperature=1.0, num_sample_generations=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=data, value_model=value, eval_dataset=data, callbacks=[timer])
    trainer.train()
    trainer.save_model(spec["out"])
    return {"rc": 0, "step_ends": timer.ends, "threads": torch.get_num_threads()}


def generate(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in read_jsonl(spec["prompts"])]
    b = spec["batch_size"]

    @torch.no_grad()
    def sample(n: int) -> int:
        tokens = 0
        for i in range(0, len(texts), b):
            enc = tok(texts[i : i + b], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"]):
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=tok.pad_token_id)
            tokens += out[:, enc["input_ids"].shape[1]:].numel()
        return tokens

    torch.manual_seed(0)
    sample(4)  # warm-up, as on the tether side
    t0 = time.time()
    tokens = sample(spec["new_tokens"])
    seconds = time.time() - t0
    return {"rc": 0, "tokens": tokens, "seconds": seconds, "rows": len(texts), "rows_at_budget": len(texts), "forced": True,
            "threads": torch.get_num_threads()}


def main() -> None:
    result_path, mode, spec_path = sys.argv[1:]
    with open(spec_path) as f:
        spec = json.load(f)
    result = generate(spec) if mode == "generate" else train(mode, spec)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
