"""`tether run RECIPE.yaml`: stages in one run folder, each stage's inputs naming earlier outputs.

A recipe:

    name: my-pipeline
    out: runs/my-pipeline            # the run folder; each stage writes to RUN/<stage name>
    stages:                          # run in this order
      sft:                           # the stage name is its kind, unless `kind:` says otherwise
        model: {name: builtin:smollm2-135m-instruct}
        train: {max_steps: 40}
      label:
        model: {name: "${sft.model}"}        # an earlier stage's output
      rm:
        model: {name: "${sft.model}"}
        data: {path: "${label.train}", eval_path: "${label.eval}"}
      ppo_low_beta:
        kind: ppo
        ...

`${stage.key}` is read from that stage's summary.json (`model`, or a section with a `path`, such as
label's `train`); `${stage.out}` is its folder. A stage's section is exactly the config of
`tether <kind>` (its own `out` is set by the pipeline).

Re-running skips finished stages: RUN/pipeline.json records each stage's status and a hash of its
resolved config, the identity of the outputs it read and the content of the files it names, so
editing a stage's config or data file, or rerunning one (`--force STAGE`), reruns it and everything
downstream of it. A stage that was interrupted resumes from its newest checkpoint when its config is
unchanged, so a killed pipeline redoes only what was not finished. Stage names are folder names
(letters, digits, '-' and '_'), checked before anything runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from tether.config import (AnnotateExportConfig, CAILabelConfig, CAIReviseConfig, DirectConfig, EvalConfig, EvalRMConfig, LabelConfig, PPOConfig, RMConfig, SFTConfig, _set_dotted,
                           load_config, parse_override, read_yaml)
from tether.errors import TetherError
from tether.runloop import _atomic_write_text

log = logging.getLogger("tether")
REF = re.compile(r"\$\{([A-Za-z0-9_\-]+)\.([A-Za-z0-9_.\-/]+)\}")
STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a stage name is a folder name in RUN/: never '..', '/abs' or 'a/b'


def _call(module: str, function: str, report: str | None = None) -> Callable[[Any], dict]:
    """A stage runner that imports its stage only when it runs (and prints the stage's report, if any)."""

    def run(cfg) -> dict:
        mod = importlib.import_module(f"tether.stages.{module}")
        summary = getattr(mod, function)(cfg)
        if report and summary.get("status") == "done":
            print(getattr(mod, report)(summary), file=sys.stderr)
        return summary

    return run


def _direct(method: str) -> Callable[[Any], dict]:
    """dpo, kto and orpo share one config and one trainer; the kind sets direct.method."""

    def run(cfg) -> dict:
        from tether.stages import direct

        return direct.train(direct.with_method(cfg, method))

    return run


@dataclass(frozen=True)
class Kind:
    config: type
    run: Callable[[Any], dict]
    out_key: str       # the dotted config key of the stage's output folder
    resumable: bool    # has train.resume (label resumes by itself; evaluations are cheap to redo)
    continues: bool = False  # continues an unfinished run of the same config by itself (label's samples, CAI's answer cache)


KINDS = {
    "sft": Kind(SFTConfig, _call("sft", "train"), "train.out", True),
    "label": Kind(LabelConfig, _call("label", "run_label", "format_report"), "out", False, continues=True),
    "rm": Kind(RMConfig, _call("rm", "train"), "train.out", True),
    "eval_rm": Kind(EvalRMConfig, _call("eval_rm", "evaluate_rm", "format_report"), "out", False),
    "ppo": Kind(PPOConfig, _call("ppo", "train"), "train.out", True),
    "dpo": Kind(DirectConfig, _direct("dpo"), "train.out", True),  # direct.loss_type: sigmoid, ipo, ..., simpo
    "kto": Kind(DirectConfig, _direct("kto"), "train.out", True),
    "orpo": Kind(DirectConfig, _direct("orpo"), "train.out", True),
    "eval": Kind(EvalConfig, _call("evaluate", "evaluate"), "out", False),
    "cai_revise": Kind(CAIReviseConfig, _call("cai", "revise", "format_revise_report"), "out", False, continues=True),
    "cai_label": Kind(CAILabelConfig, _call("cai", "label", "format_label_report"), "out", False, continues=True),
    "annotate_export": Kind(AnnotateExportConfig, lambda cfg: importlib.import_module("tether.annotate.commands").export_stage(cfg),
                            "out", False),  # the people's answers so far -> preference data
}


# --------------------------------------------------------------------------------------------------
# Recipes


def _stage_trees(p: Path, seen: tuple = ()) -> tuple[dict, dict]:
    """(raw recipe, its stages in order): `extends: other.yaml` (relative to this recipe) puts the
    other recipe's stages first; a stage of the same name here replaces the inherited one in place."""
    if p.resolve() in seen:
        raise TetherError(f"{p}: recipes extend each other in a cycle ({' -> '.join(str(x) for x in seen)})")
    raw = read_yaml(p, "recipe")
    unknown = set(raw) - {"name", "out", "stages", "description", "extends"}
    if unknown:
        raise TetherError(f"{p}: unknown top-level key(s) {', '.join(sorted(unknown))}; a recipe has name, out, extends, stages")
    if not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise TetherError(f"{p}: 'stages' must be a non-empty mapping of stage name -> config")
    names = [_stage_name(p, name) for name in raw["stages"]]
    if len(set(names)) < len(names):
        raise TetherError(f"{p}: a stage name appears twice (as a number and as a string?): {', '.join(names)}")
    trees: dict = {}
    if raw.get("extends"):
        base = p.parent / str(raw["extends"])
        if not base.is_file():
            raise TetherError(f"{p}: extends '{raw['extends']}', but {base} does not exist")
        trees = dict(_stage_trees(base, seen + (p.resolve(),))[1])
    trees.update(zip(names, raw["stages"].values()))
    return raw, trees


def _stage_name(p: Path, name) -> str:
    """A stage name as a string, checked before anything runs: it becomes RUN/<name>, a folder the
    pipeline deletes when the stage reruns. A YAML number (`1:`) is fine as its digits."""
    text = str(name) if isinstance(name, (str, int)) and not isinstance(name, bool) else ""
    if not STAGE_NAME.fullmatch(text):
        raise TetherError(f"{p}: stage name {name!r} is not allowed: use letters, digits, '-' and '_' (it names the folder RUN/<stage>)")
    return text


def read_recipe(path: str | Path, sets: list[str] = ()) -> dict:
    """The recipe as {name, out, stages: {name: (kind, tree)}}, validated before anything runs."""
    p = Path(path)
    raw, trees = _stage_trees(p)
    stages: dict[str, tuple[str, dict]] = {}
    for name, tree in trees.items():
        tree = dict(tree or {})
        kind = tree.pop("kind", name)
        if kind not in KINDS:
            raise TetherError(f"{p}: stage '{name}' has unknown kind '{kind}'; kinds: {', '.join(KINDS)} (set `kind:`)")
        stages[name] = (kind, tree)
    for s in sets:  # --set STAGE.key=value
        key, value = parse_override(s)
        stage, _, rest = key.partition(".")
        if stage not in stages or not rest:
            raise TetherError(f"--set {s}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(stages)}")
        _set_dotted(stages[stage][1], rest, value)
    names = list(stages)
    for i, (name, (kind, tree)) in enumerate(stages.items()):
        for ref_stage, _ in REF.findall(json.dumps(tree)):
            if ref_stage not in names[:i]:
                raise TetherError(f"{p}: stage '{name}' refers to '${{{ref_stage}...}}', which is not an earlier stage")
        load_config(KINDS[kind].config, None, _placeholder(tree))  # unknown keys and bad types fail now, not hours later
    return {"name": raw.get("name", p.stem), "out": raw.get("out", f"runs/{p.stem}"), "stages": stages, "recipe": str(p)}


def _placeholder(tree):
    """The tree with references replaced by dummies, for validation before the stages ran: a value that
    is one whole reference becomes 0 (it may be a number, e.g. `${eval_rm.length_slope}`), a reference
    inside a longer string becomes 'REF'."""
    whole = re.compile(f'"{REF.pattern}"')
    return json.loads(REF.sub("REF", whole.sub("0", json.dumps(tree))))


def _lookup(stage: str, key: str, outputs: dict[str, dict]) -> Any:
    """The value of `key` in an earlier stage's summary (a {'path': ...} entry gives its path)."""
    s = outputs[stage]
    if key == "out":
        return s["_out"]
    node: Any = s
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise TetherError(f"${{{stage}.{key}}}: stage '{stage}' has no output '{key}' (its summary has {', '.join(k for k in s if not k.startswith('_'))})")
        node = node[part]
    if isinstance(node, dict) and "path" in node:
        node = node["path"]
    return node


def resolve(tree, outputs: dict[str, dict]):
    """Substitute ${stage.key} in every string of a config tree; a string that is one whole reference
    takes the value itself, so numbers stay numbers."""
    if isinstance(tree, dict):
        return {k: resolve(v, outputs) for k, v in tree.items()}
    if isinstance(tree, list):
        return [resolve(v, outputs) for v in tree]
    if isinstance(tree, str):
        whole = REF.fullmatch(tree)
        if whole:
            value = _lookup(whole.group(1), whole.group(2), outputs)
            return value if isinstance(value, (int, float, bool)) else str(value)
        return REF.sub(lambda m: str(_lookup(m.group(1), m.group(2), outputs)), tree)
    return tree


# --------------------------------------------------------------------------------------------------
# Running


def run(recipe: str | Path, out: str | None = None, force: list[str] = (), sets: list[str] = (), report: bool = True) -> int:
    r = read_recipe(recipe, sets)
    root = Path(out or r["out"])
    for name in force:
        if name not in r["stages"]:
            raise TetherError(f"--force {name}: no such stage (stages: {', '.join(r['stages'])})")
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / ".lock", "w")  # one pipeline per run folder: two would delete each other's stages
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise TetherError(f"{root} is in use by another `tether run` (wait for it, or stop it first)") from None
    state_path = root / "pipeline.json"
    old = {s["name"]: s for s in json.loads(state_path.read_text())["stages"]} if state_path.exists() else {}
    state = {"name": r["name"], "recipe": r["recipe"], "stages": []}
    outputs: dict[str, dict] = {}
    forced, t_all = set(force), time.time()

    def save():
        _atomic_write_text(state_path, json.dumps(state, indent=2))

    for name, (kind, tree) in r["stages"].items():
        K = KINDS[kind]
        stage_out = root / name
        resolved = resolve(tree, outputs)
        upstream = sorted({s for s, _ in REF.findall(json.dumps(tree))})
        digest = _hash(kind, resolved, [outputs[u]["_token"] for u in upstream], _input_files(resolved, root))
        if any(u in forced for u in upstream):
            forced.add(name)  # a rerun upstream stage gives new inputs: downstream reruns too
        prev = old.get(name, {})
        summary_path = stage_out / "summary.json"
        entry = {"name": name, "kind": kind, "out": str(stage_out), "hash": digest}
        if (name not in forced and prev.get("status") == "done" and prev.get("hash") == digest and summary_path.exists()):
            summary = json.loads(summary_path.read_text())
            outputs[name] = {**summary, "_out": str(stage_out), "_token": prev["token"]}
            state["stages"].append({**prev, "skipped": True})
            save()
            print(f"tether: [{name}] finished earlier, skipped (--force {name} reruns it)", file=sys.stderr)
            continue
        resume = (K.resumable and prev.get("hash") == digest and prev.get("status") != "done" and name not in forced
                  and (any((stage_out / "checkpoints").glob("step-*/progress.json"))
                       or any((stage_out / "members").glob("m*/checkpoints/step-*/progress.json"))))  # rm ensemble: its members
        # a stage that continues by itself keeps an unfinished folder of the same config (its samples, its answer cache)
        keep = K.continues and prev.get("hash") == digest and prev.get("status") != "done" and name not in forced
        if stage_out.exists() and not (resume or keep):
            shutil.rmtree(stage_out)  # stale: another config or inputs, forced, or nothing to resume from
        sets_ = [f"{K.out_key}={stage_out}"] + (["train.resume=true", "train.overwrite=false"] if resume else [])
        cfg = load_config(K.config, None, resolved, sets_)
        state["stages"].append({**entry, "status": "running", "started": time.time()})
        save()
        print(f"tether: [{name}] {kind} -> {stage_out}{' (resuming)' if 'train.resume=true' in sets_ else ''}", file=sys.stderr)
        t0 = time.time()
        try:
            summary = K.run(cfg)
        except BaseException:
            state["stages"][-1].update(status="failed", wall_time_s=round(time.time() - t0, 1))
            save()
            raise
        status = summary.get("status", "done")
        state["stages"][-1].update(status=status, wall_time_s=round(time.time() - t0, 1), token=f"{digest[:12]}-{time.time():.3f}")
        save()
        if status != "done":
            print(f"tether: [{name}] {status}; run the same command again to continue", file=sys.stderr)
            return 130
        outputs[name] = {**summary, "_out": str(stage_out), "_token": state["stages"][-1]["token"]}
    state["wall_time_s"] = round(time.time() - t_all, 1)
    save()
    print(_timings(state), file=sys.stderr)
    if report:
        from tether.report import write_report

        print(f"tether: report: {write_report(root)}", file=sys.stderr)
    return 0


def _hash(kind: str, resolved: dict, upstream_tokens: list[str], files: list) -> str:
    blob = json.dumps({"kind": kind, "config": resolved, "inputs": upstream_tokens, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _input_files(tree, root: Path) -> list:
    """The content identity of every existing file or folder a config tree names, so that a data file
    edited in place (same name, same config) reruns its stage: a file gives (path, size, mtime_ns,
    sha256 of its bytes); a folder (a model of your own) gives its files' (relative path, size,
    mtime_ns), without reading big weights. Paths inside the run folder are skipped (the upstream
    stages' tokens cover them), and so is a folder holding the run folder (it would see the run's
    own writes and never match again)."""
    strings = []

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node:
            strings.append(node)

    walk(tree)
    run_root, found = root.resolve(), []
    for s in strings:
        try:
            p = Path(s)
            if not p.exists():
                continue
            full = p.resolve()
        except (OSError, ValueError):  # not a path at all (too long, a NUL byte)
            continue
        if full.is_relative_to(run_root) or run_root.is_relative_to(full):
            continue
        if p.is_file():
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            st = p.stat()
            found.append([s, st.st_size, st.st_mtime_ns, digest.hexdigest()])
        elif p.is_dir():
            stats = {str(f.relative_to(p)): f.stat() for f in p.rglob("*") if f.is_file()}
            found.append([s, [[name, st.st_size, st.st_mtime_ns] for name, st in sorted(stats.items())]])
    return found


def _timings(state: dict) -> str:
    rows = [f"  {s['name']:<14} {s['kind']:<11} {'skipped' if s.get('skipped') else s['status']:<9}{s.get('wall_time_s', 0):>8.0f} s"
            for s in state["stages"]]
    return "\n".join(["tether: stage wall times", *rows, f"  {'total':<36}{state.get('wall_time_s', 0):>8.0f} s"])


# --------------------------------------------------------------------------------------------------
# The README's main command


def quickstart(fast: bool = False, out: str | None = None, force: list[str] = (), sets: list[str] = ()) -> int:
    """The shipped quickstart recipe, then the final table (from the last eval stage)."""
    name = "quickstart-fast.yaml" if fast else "quickstart.yaml"
    with resources.as_file(resources.files("tether.recipes") / name) as recipe:
        r = read_recipe(recipe, sets)
        root = Path(out or r["out"])
        code = run(recipe, out=str(root), force=force, sets=sets)
    if code == 0:
        from tether.stages.evaluate import format_table

        evals = [n for n, (k, _) in r["stages"].items() if k == "eval"]
        if evals:
            print(format_table(json.loads((root / evals[-1] / "summary.json").read_text())))
        print(f"\nreport: {root / 'report' / 'index.html'}")
    return code
