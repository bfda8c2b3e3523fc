"""`tether quickstart`: SFT the embedded model on the built-in demonstrations and show before/after.

(The pipeline issue turns this into the full recipe: SFT -> label -> RM -> PPO -> report.)
"""

from __future__ import annotations

import textwrap
from importlib import resources

from tether import data as D
from tether.config import SFTConfig, load_config
from tether.models import load_causal_lm, load_tokenizer
from tether.rollout import generate
from tether.stages import sft

N_SAMPLES = 3


def quickstart(out: str = "runs/quickstart", fast: bool = False, model: str | None = None) -> int:
    with resources.as_file(resources.files("tether.recipes") / "quickstart-sft.yaml") as recipe:
        cfg = load_config(SFTConfig, recipe, {"train.out": out, "model.name": model})
    if fast:  # a first look in a few minutes: fewer steps, a third of the held-out set
        cfg.train.epochs, cfg.train.max_steps, cfg.train.eval_batches = 1.0, 12, 1
    cfg.train.resume = True  # a re-run continues an interrupted quickstart instead of refusing

    tok = load_tokenizer(cfg.model.name)
    _, eval_set = sft.load_data(cfg, tok)
    rows = D.read_rows(cfg.data.path)
    by_number = dict(zip(rows.numbers, D.normalise_sft(rows)))
    prompts = [[m for m in by_number[e["row"]]["messages"] if m["role"] != "assistant"][:1] for e in eval_set[:N_SAMPLES]]

    before = [s.text for s in generate(load_causal_lm(cfg.model.name), tok, prompts, max_new_tokens=48)]
    summary = sft.train(cfg)
    if summary["status"] != "done":
        return 130
    after = [s.text for s in generate(load_causal_lm(summary["model"]), tok, prompts, max_new_tokens=48)]
    print(format_table(summary, prompts, before, after))
    return 0


def format_table(summary: dict, prompts, before: list[str], after: list[str]) -> str:
    import math

    b, a = summary["eval/loss_initial"], summary["eval/loss"]
    lines = [
        "",
        f"{'held-out demonstrations':<28}{'base':>10}{'SFT':>10}",
        f"{'loss (assistant tokens)':<28}{b:>10.4f}{a:>10.4f}",
        f"{'perplexity':<28}{math.exp(b):>10.2f}{math.exp(a):>10.2f}",
        "",
        f"steps {summary['steps']}, {summary['train_examples']} train / {summary['eval_examples']} held-out examples, "
        f"{summary['wall_time_s']:.0f} s, peak memory {summary['peak_memory_mb']:.0f} MB",
        f"model: {summary['model']}",
        "",
    ]
    short = lambda s: textwrap.shorten(s.replace("\n", " "), 110, placeholder=" ...")  # noqa: E731
    for p, x, y in zip(prompts, before, after):
        lines += [f"prompt: {short(p[-1]['content'])}", f"  base: {short(x)}", f"  SFT:  {short(y)}", ""]
    return "\n".join(lines)
