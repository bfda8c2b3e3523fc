"""Constitutions for Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

A constitution is a YAML file of principles:

    name: my-constitution
    principles:
      - name: harm                      # unique
        critique: Point out any way ... # SL-CAI: asked after the model's answer (the critique request)
        revision: Rewrite the answer ...# SL-CAI: asked after the critique (the revision request)
        compare: Which answer is ...?   # RL-CAI: the labeller's multiple-choice question (optional)
        examples: [...]                 # optional few-shot turns for this principle
    examples:                           # optional few-shot turns shown with every principle; each has
      - {prompt, response, critique_request, critique, revision_request, revision}

`builtin:default` is tether's own (src/tether/constitutions/default.yaml): harmlessness and
helpfulness together, with principles against over-refusal, evasiveness and lecturing. A bad file
gets one error naming the file, the principle (1-based) and the field, like a bad data row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from tether.errors import TetherError

EXAMPLE_FIELDS = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")
PRINCIPLE_FIELDS = ("name", "critique", "revision", "compare", "examples")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    compare: str = ""
    examples: tuple = ()


@dataclass
class Constitution:
    name: str
    principles: list[Principle]
    examples: tuple = ()  # few-shot turns shown with every principle
    source: str = ""

    def sampler(self, seed: int | str, need_compare: bool = False) -> "PrincipleSampler":
        pool = [p for p in self.principles if p.compare] if need_compare else list(self.principles)
        if not pool:
            raise TetherError(f"{self.source}: no principle has a 'compare' question, which the AI labeller (cai label) asks")
        return PrincipleSampler(pool, seed)

    def few_shot(self, p: Principle) -> tuple:
        return tuple(self.examples) + tuple(p.examples)


class PrincipleSampler:
    """Principles drawn uniformly at random with replacement, as Bai et al. do (one per critique-revision
    round, one per labelled pair); seeded, so a rerun draws the same sequence."""

    def __init__(self, principles: list[Principle], seed: int | str):
        self.principles = principles
        self.rng = random.Random(f"principles-{seed}")

    def __call__(self) -> Principle:
        return self.principles[self.rng.randrange(len(self.principles))]


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TetherError(f"{where}: must be a non-empty string, got {value!r}")
    return value.strip()


def _mapping(value, fields: tuple, where: str, what: str) -> None:
    if not isinstance(value, dict):
        raise TetherError(f"{where}: must be a mapping with {', '.join(fields)}")
    extra = set(value) - set(fields)
    if extra:
        raise TetherError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; {what} has {', '.join(fields)}")


def _examples(value, where: str) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TetherError(f"{where}: must be a list of examples, each with {', '.join(EXAMPLE_FIELDS)}")
    out = []
    for j, ex in enumerate(value, start=1):
        w = f"{where}, example {j}"
        _mapping(ex, EXAMPLE_FIELDS, w, "an example")
        out.append({k: _text(ex.get(k), f"{w}, field '{k}'") for k in EXAMPLE_FIELDS})
    return tuple(out)


def parse_constitution(data, source: str) -> Constitution:
    if not isinstance(data, dict):
        raise TetherError(f"{source}: a constitution is a mapping with 'principles' (a list)")
    extra = set(data) - {"name", "principles", "examples", "description"}
    if extra:
        raise TetherError(f"{source}: unknown top-level key(s) {', '.join(sorted(extra))}; a constitution has name, principles, examples")
    items = data.get("principles")
    if not isinstance(items, list) or not items:
        raise TetherError(f"{source}: 'principles' must be a non-empty list")
    principles, names = [], set()
    for i, p in enumerate(items, start=1):
        where = f"{source}, principle {i}"
        _mapping(p, PRINCIPLE_FIELDS, where, "a principle")
        name = _text(p.get("name"), f"{where}, field 'name'")
        where = f"{source}, principle {i} ('{name}')"
        if name in names:
            raise TetherError(f"{where}, field 'name': a principle of this name comes earlier")
        names.add(name)
        principles.append(Principle(
            name=name,
            critique=_text(p.get("critique"), f"{where}, field 'critique'"),
            revision=_text(p.get("revision"), f"{where}, field 'revision'"),
            compare=_text(p["compare"], f"{where}, field 'compare'") if p.get("compare") is not None else "",
            examples=_examples(p.get("examples"), f"{where}, field 'examples'"),
        ))
    return Constitution(str(data.get("name") or Path(source).stem), principles,
                        _examples(data.get("examples"), f"{source}, field 'examples'"), source)


def load_constitution(spec: str = "builtin:default") -> Constitution:
    """A constitution from `builtin:NAME` (shipped in tether/constitutions) or a YAML file."""
    if spec.startswith("builtin:"):
        f = resources.files("tether.constitutions") / f"{spec[8:]}.yaml"
        if not f.is_file():
            known = sorted(x.name[:-5] for x in resources.files("tether.constitutions").iterdir() if x.name.endswith(".yaml"))
            raise TetherError(f"unknown constitution '{spec}'; built in: {', '.join('builtin:' + k for k in known)}")
        text, source = f.read_text(encoding="utf-8"), spec
    else:
        p = Path(spec).expanduser()
        if not p.is_file():
            raise TetherError(f"constitution file not found: {spec}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TetherError(f"{spec}: not a UTF-8 text file") from None
        source = str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TetherError(f"{source}: invalid YAML: {e}") from None
    return parse_constitution(data, source)
