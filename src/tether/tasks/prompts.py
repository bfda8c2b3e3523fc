"""Your own prompts as a task: prompt-only data (`prompt` as a string or a message list, in any file
format tether reads) and no gold scorer. RL then optimises the reward you give it (a reward model, a
Python function) and reports no gold score, since nothing knows the true quality of these answers."""

from __future__ import annotations

from tether import data as D
from tether.errors import TetherError
from tether.tasks import Gold, Prompt, Task


def read_prompts(path: str) -> list[Prompt]:
    """Validated prompts of a file; every row is checked before anything runs (row-level errors)."""
    rows = D.read_rows(path)
    out = []
    for item in D.normalise_prompts(rows):
        meta = dict(item["meta"])
        pid = str(meta.pop("id", f"{rows.source}:{item['row']}"))
        out.append(Prompt(pid, item["messages"], {**meta, "row": item["row"], "source": rows.source}))
    return out


class PromptFileTask(Task):
    """Train prompts from `path`, held-out prompts from `eval_path` (none without it)."""

    name = "prompts"
    has_gold = False

    def __init__(self, path: str, eval_path: str = ""):
        self._splits = {"train": read_prompts(path), "eval": read_prompts(eval_path) if eval_path else []}

    def prompts(self, split: str = "train") -> list[Prompt]:
        return list(self._splits[split])

    def gold(self, prompt: Prompt, response: str, finished: bool = True) -> Gold:
        raise TetherError("your own prompts have no gold scorer; give a task (task.name) for gold scores")
