"""`tether run`: references between stages, skipping finished stages, resuming a killed pipeline."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import chat, write_jsonl
from tether import pipeline
from tether.errors import TetherError

TESTS = Path(__file__).parent


def tiny_recipe(tmp_path, rm_steps=200):
    data = write_jsonl(tmp_path / "demos.jsonl", [chat(f"Say {w}.", f"{w} {w}.") for w in ("yes", "no", "maybe") * 8])
    recipe = {
        "name": "tiny",
        "out": str(tmp_path / "run"),
        "stages": {
            "sft": {"model": {"name": "builtin:tiny", "dtype": "fp32"}, "data": {"path": str(data)},
                    "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "report_to": "none", "save_every": 0}},
            "label": {"model": {"name": "${sft.model}"}, "task": {"name": "test_tasks:EchoTask"},
                      "sample": {"k": 3, "max_new_tokens": 6, "batch_size": 3, "temperature": 1.0, "top_p": 1.0}},
            "rm": {"model": {"name": "${sft.model}", "dtype": "fp32"}, "data": {"path": "${label.train}", "eval_path": "${label.eval}"},
                   "train": {"max_steps": rm_steps, "batch_size": 1, "lr": 1e-3, "report_to": "none", "save_every": 1,
                             "keep_checkpoints": 1}},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def metrics(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_killed_in_the_rm_stage_reruns_only_what_was_not_finished(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tether", "run", str(recipe), "--no-report"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list((run / "rm" / "checkpoints").glob("step-*/progress.json")):  # the RM stage has taken a few steps
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the RM stage never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the hard case
    proc.wait()
    state = {s["name"]: s for s in json.loads((run / "pipeline.json").read_text())["stages"]}
    assert state["sft"]["status"] == "done" and state["label"]["status"] == "done" and state["rm"]["status"] == "running"
    killed_at = max(m["step"] for m in metrics(run / "rm"))
    assert 0 < killed_at < 200
    stamps = {n: (run / n / "summary.json").stat().st_mtime_ns for n in ("sft", "label")}

    assert pipeline.run(recipe, report=False) == 0
    state = {s["name"]: s for s in json.loads((run / "pipeline.json").read_text())["stages"]}
    assert state["sft"].get("skipped") and state["label"].get("skipped") and state["rm"]["status"] == "done"
    assert {n: (run / n / "summary.json").stat().st_mtime_ns for n in ("sft", "label")} == stamps  # not redone
    steps = [m["step"] for m in metrics(run / "rm") if "train/loss" in m]
    assert steps == list(range(1, 201))  # resumed from its checkpoint: every step once, none twice
    assert yaml.safe_load((run / "rm" / "config.yaml").read_text())["model"]["name"] == str(run / "sft" / "model")

    # nothing changed: everything is skipped; a changed RM config reruns the RM only
    assert pipeline.run(recipe, report=False) == 0
    assert all(s.get("skipped") for s in json.loads((run / "pipeline.json").read_text())["stages"])
    assert pipeline.run(recipe, report=False, sets=["rm.train.max_steps=4"]) == 0
    state = {s["name"]: s for s in json.loads((run / "pipeline.json").read_text())["stages"]}
    assert state["label"].get("skipped") and not state["rm"].get("skipped")
    assert [m["step"] for m in metrics(run / "rm") if "train/loss" in m] == [1, 2, 3, 4]
    # forcing a stage reruns it and everything that reads its outputs
    assert pipeline.run(recipe, report=False, sets=["rm.train.max_steps=4"], force=["label"]) == 0
    state = {s["name"]: s for s in json.loads((run / "pipeline.json").read_text())["stages"]}
    assert state["sft"].get("skipped") and not state["label"].get("skipped") and not state["rm"].get("skipped")


def test_references_resolve_from_summaries():
    outputs = {"sft": {"model": "runs/x/sft/model", "_out": "runs/x/sft"},
               "label": {"train": {"path": "runs/x/label/train.jsonl", "pairs": 3}, "_out": "runs/x/label"}}
    tree = {"model": {"name": "${sft.model}"}, "data": {"path": "${label.train}", "note": "${label.out}/extra", "n": 3}}
    assert pipeline.resolve(tree, outputs) == {"model": {"name": "runs/x/sft/model"},
                                               "data": {"path": "runs/x/label/train.jsonl", "note": "runs/x/label/extra", "n": 3}}
    with pytest.raises(TetherError, match=r"stage 'sft' has no output 'adapter'"):
        pipeline.resolve({"x": "${sft.adapter}"}, outputs)


def test_a_whole_reference_keeps_its_type_and_validates(tmp_path):
    """`${eval_rm.length_slope}` feeds a float field: resolved as the number, and accepted by the
    validation that runs before any stage."""
    outputs = {"eval_rm": {"length_slope": 0.0125, "length_mean": 210.5, "model": "rm/model", "_out": "r/eval_rm"}}
    tree = {"reward": {"model": "${eval_rm.model}", "length_slope": "${eval_rm.length_slope}", "length_center": "${eval_rm.length_mean}"}}
    assert pipeline.resolve(tree, outputs) == {"reward": {"model": "rm/model", "length_slope": 0.0125, "length_center": 210.5}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": {"eval_rm": {"model": "m", "data": "d"}, "ppo": tree}}))
    assert pipeline.read_recipe(recipe)["stages"]["ppo"][0] == "ppo"


def test_a_recipe_extends_another(tmp_path):
    """`extends`: the base recipe's stages come first, a stage of the same name is replaced in place,
    and new stages follow; a missing base or a cycle is an error."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"out": "runs/base", "stages": {
        "sft": {"train": {"max_steps": 3}}, "eval": {"models": {"sft": "${sft.model}"}}}}, sort_keys=False))
    (tmp_path / "more.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "out": "runs/base", "stages": {
        "sft": {"train": {"max_steps": 5}}, "dpo": {"model": {"name": "${sft.model}"}, "data": {"path": "x"}},
        "eval_more": {"kind": "eval", "models": {"dpo": "${dpo.model}"}}}}, sort_keys=False))
    r = pipeline.read_recipe(tmp_path / "more.yaml")
    assert list(r["stages"]) == ["sft", "eval", "dpo", "eval_more"]
    assert r["stages"]["sft"] == ("sft", {"train": {"max_steps": 5}}) and r["stages"]["eval_more"][0] == "eval"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"extends": "nowhere.yaml", "stages": {"sft": {}}}))
    with pytest.raises(TetherError, match="nowhere.yaml.*does not exist"):
        pipeline.read_recipe(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"extends": "loop.yaml", "stages": {"sft": {}}}))
    with pytest.raises(TetherError, match="cycle"):
        pipeline.read_recipe(tmp_path / "loop.yaml")


@pytest.mark.parametrize("stages,message", [
    ({"sft": {"model": {"name": "${rm.model}"}}, "rm": {}}, "refers to '\\${rm...}', which is not an earlier stage"),
    ({"polish": {}}, "stage 'polish' has unknown kind 'polish'"),
    ({"sft": {"train": {"lrr": 1}}}, "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ({"sft": {"train": {"lr": "fast"}}}, "config key 'train.lr' expects float"),
    ({}, "'stages' must be a non-empty mapping"),
])
def test_recipe_errors_are_caught_before_anything_runs(tmp_path, stages, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "stages": stages}, sort_keys=False))
    with pytest.raises(TetherError, match=message):
        pipeline.run(path, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_cli_flags_are_checked(tmp_path):
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(TetherError, match="--force polish: no such stage"):
        pipeline.run(recipe, force=["polish"])
    with pytest.raises(TetherError, match="expected STAGE.KEY=VALUE"):
        pipeline.run(recipe, sets=["nosuch.train.lr=1"])


def test_a_run_folder_is_locked_while_a_pipeline_uses_it(tmp_path):
    import fcntl

    recipe = tiny_recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `tether run` holds it
        with pytest.raises(TetherError, match="in use by another `tether run`"):
            pipeline.run(recipe, report=False)
    assert not (run / "sft").exists()


@pytest.mark.parametrize("name", ["..", "ABS", "a/b", "", None])
def test_a_stage_name_that_is_not_a_plain_folder_name_is_refused_before_anything_runs(tmp_path, name):
    """A stage name becomes RUN/<name>, which a rerun deletes: '..' or an absolute path would delete a
    folder outside the run. Nothing is created or deleted, in the recipe, its base, or the flags."""
    sentinel = tmp_path / "sentinel"
    (sentinel / "keep").mkdir(parents=True)
    name = str(sentinel) if name == "ABS" else name
    run = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": {name: {"kind": "sft"}}}))
    with pytest.raises(TetherError, match=rf"r\.yaml: stage name .* is not allowed: use letters, digits, '-' and '_'"):
        pipeline.run(path, out=str(run))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "r.yaml", "stages": {"sft": {}}}))
    with pytest.raises(TetherError, match=r"r\.yaml: stage name"):  # an inherited stage names its own recipe
        pipeline.run(tmp_path / "child.yaml", out=str(run))
    assert not run.exists() and (sentinel / "keep").is_dir()


def test_stage_names_in_flags_and_numbers(tmp_path):
    """--force/--set name only the recipe's (checked) stages; a YAML number is a name as its digits."""
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  1: {kind: sft}\n")
    assert list(pipeline.read_recipe(path)["stages"]) == ["1"]
    run = tmp_path / "run"
    with pytest.raises(TetherError, match=r"--force \.\.: no such stage"):
        pipeline.run(path, out=str(run), force=[".."])
    with pytest.raises(TetherError, match="expected STAGE.KEY=VALUE"):
        pipeline.run(path, out=str(run), sets=["../x.train.lr=1"])
    assert not run.exists()
    path.write_text("stages:\n  1: {kind: sft}\n  '1': {kind: sft}\n")
    with pytest.raises(TetherError, match="a stage name appears twice"):
        pipeline.read_recipe(path)


def test_a_data_file_edited_in_place_reruns_its_stage(tmp_path):
    """The stage hash covers the content of the files a stage reads, not only their names: one
    character changed, with the size and even the mtime restored, reruns the stage; nothing changed
    skips it."""
    data = write_jsonl(tmp_path / "demos.jsonl", [chat(f"Say {w}.", f"{w} {w}.") for w in ("yes", "no", "maybe") * 4])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "stages": {"sft": {
        "model": {"name": "builtin:tiny", "dtype": "fp32"}, "data": {"path": str(data)},
        "train": {"max_steps": 1, "batch_size": 4, "report_to": "none"}}}}))

    def skipped():
        assert pipeline.run(path, report=False) == 0
        return json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"][0].get("skipped", False)

    assert not skipped()
    assert skipped()
    st = data.stat()
    data.write_text(data.read_text().replace("maybe", "mayb3", 1))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    assert not skipped()
    assert skipped()


def test_input_identity_of_files_and_folders(tmp_path):
    """A folder outside the run is listed (names, sizes, mtimes), a file is hashed; paths inside the
    run folder, folders holding it, and strings that are not paths are left out."""
    run = tmp_path / "run"
    (run / "sft" / "model").mkdir(parents=True)
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    tree = {"model": {"name": str(mine)}, "data": {"path": str(run / "sft" / "model"), "x": [str(tmp_path), "cosine", "a" * 5000]}}
    found = pipeline._input_files(tree, run)
    assert [f[0] for f in found] == [str(mine)] and [f[0] for f in found[0][1]] == ["config.json"]
    (mine / "model.safetensors").write_text("w")
    assert pipeline._input_files(tree, run) != found
    f = tmp_path / "d.jsonl"
    f.write_text("ab")
    (entry,) = pipeline._input_files({"p": str(f)}, run)
    assert entry[:2] == [str(f), 2] and entry[3] == hashlib.sha256(b"ab").hexdigest()
