"""A task whose gold scorer is a reward model: `rm:PATH` (prompts of builtin:instruct) or
`rm:PATH@TASK` (prompts of any other task). Use a bigger, better reward model as the gold standard
for a smaller proxy, as in Gao, Schulman & Hilton (2022), "Scaling Laws for Reward Model
Overoptimization".

gold = sigmoid((r - mean) / std), with mean and std stored by `tether rm` in the model's config
(0 and 1 when absent), so the score lies in [0, 1] like every gold score.
"""

from __future__ import annotations

import math

import torch

from tether.tasks import Gold, Prompt, Task, load_task


class RewardModelTask(Task):
    def __init__(self, path: str, prompts_from: str = "builtin:instruct", max_length: int = 1024):
        from tether.models import load_reward_model

        self.name = f"rm:{path}"
        self.base = load_task(prompts_from)
        self.model, self.tok = load_reward_model(path)
        self.model.eval()
        cfg = self.model.config
        self.mean = getattr(cfg, "tether_reward_mean", 0.0)
        self.std = getattr(cfg, "tether_reward_std", 1.0) or 1.0
        self.max_length = max_length

    def prompts(self, split: str = "train") -> list[Prompt]:
        return self.base.prompts(split)

    @torch.no_grad()
    def gold(self, prompt: Prompt, response: str, finished: bool = True) -> Gold:
        from tether.data import tokenize_scored
        from tether.models import sequence_scores

        ids = tokenize_scored(self.tok, prompt.messages + [{"role": "assistant", "content": response}], self.max_length)
        r = sequence_scores(self.model, torch.tensor([ids]), torch.tensor([len(ids)])).item()
        z = (r - self.mean) / self.std
        return Gold(1 / (1 + math.exp(-z)) if z > -50 else 0.0, {"reward": r})
