"""Tasks: prompts (train / eval splits) plus a gold scorer nobody trains on.

A task answers two questions: which prompts to ask (`prompts(split)`), and how good a response really
is (`gold(prompt, response, finished) -> Gold`, a score in [0, 1] with a per-check breakdown). The
gold score is the measuring stick: reward models and policies are trained on proxies (annotator
labels, a learned reward), and the gold score shows whether they really improved.

Register your own task with `register_task("name", MyTask)`, as `module.path:ClassName`, or as an
entry point in the group `tether.tasks`. A task whose gold scorer is a bigger reward model is just
a Task whose `gold` calls that model.
"""

from __future__ import annotations

import importlib
import random
import importlib.metadata
from dataclasses import dataclass, field

from tether.errors import TetherError


@dataclass
class Prompt:
    id: str
    messages: list[dict]                      # the prompt as a chat (usually one user message)
    meta: dict = field(default_factory=dict)  # checks, category, split, ...

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Gold:
    score: float                                         # in [0, 1]
    breakdown: dict[str, float] = field(default_factory=dict)  # check name -> pass value in [0, 1]
    penalties: dict[str, float] = field(default_factory=dict)  # degenerate-text penalties applied


def subset(prompts: list[Prompt], n: int, seed: str) -> list[Prompt]:
    """n prompts drawn at random (seeded) in their original order, or all when n is 0 or too large.
    Task files are grouped by category, so their first n would test one or two kinds of prompt."""
    if not n or n >= len(prompts):
        return list(prompts)
    keep = set(random.Random(seed).sample(range(len(prompts)), n))
    return [p for i, p in enumerate(prompts) if i in keep]


class Task:
    """Base class. Subclasses set `name` and implement `prompts` and `gold`. A task without a gold
    scorer (your own prompts) sets `has_gold = False`: gold metrics and gold-based checks are then
    absent, not zero."""

    name = "task"
    has_gold = True

    def prompts(self, split: str = "train") -> list[Prompt]:
        raise NotImplementedError

    def gold(self, prompt: Prompt, response: str, finished: bool = True) -> Gold:
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register_task(name: str, cls: type) -> None:
    _REGISTRY[name] = cls


def load_task(name: str) -> Task:
    """builtin:instruct, a registered name, `rm:PATH[@TASK]` (a reward model as gold scorer),
    `package.module:Class`, or a `tether.tasks` entry point."""
    from tether.tasks import instruct  # noqa: F401  (registers the builtin tasks)

    if name in _REGISTRY:
        return _REGISTRY[name]()
    if name.startswith("rm:"):  # a reward model as the gold scorer: rm:PATH or rm:PATH@TASK
        from tether.tasks.rm_gold import RewardModelTask

        path, _, base = name[3:].partition("@")
        return RewardModelTask(path, base or "builtin:instruct")
    if ":" in name and not name.startswith("builtin:"):
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as e:
            raise TetherError(f"cannot load task '{name}': {e}") from None
    for ep in importlib.metadata.entry_points(group="tether.tasks"):
        if ep.name == name:
            return ep.load()()
    known = ", ".join(sorted(_REGISTRY))
    raise TetherError(f"unknown task '{name}'; known: {known}, or give 'package.module:ClassName'")
