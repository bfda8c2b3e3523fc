"""The run folder: a fresh run never clobbers finished work unasked and never leaves stale files beside
its own; `--resume` and label's self-resume keep what they continue."""

import json

import pytest

from tether.cli import main
from tether.config import EvalConfig, LabelConfig, load_config
from tether.errors import TetherError
from tether.runloop import Run


def sft(out, data, *extra):
    return main(["sft", "--model", "builtin:tiny", "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--report-to", "none", *extra])


def plant_stale(out):
    """Leftovers of an earlier, larger save: a second weight shard and a LoRA run's adapter."""
    stale = [out / "model" / "model-00002-of-00002.safetensors", out / "adapter" / "x"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("old")
    return stale


def test_a_finished_run_is_refused_unless_overwrite_and_overwrite_leaves_no_stale_file(tmp_path, chat_file, capsys):
    out = tmp_path / "run"
    assert sft(out, chat_file) == 0
    stale = plant_stale(out)
    summary = (out / "summary.json").read_text()
    capsys.readouterr()

    assert sft(out, chat_file) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"tether: error: {out} holds a finished run: pass --resume to continue it, --overwrite to replace it "
                   "(the folder is emptied first), or choose another --out")
    assert (out / "summary.json").read_text() == summary and all(p.exists() for p in stale)  # untouched

    assert sft(out, chat_file, "--overwrite") == 0
    assert not any(p.exists() for p in stale) and not (out / "adapter").exists()  # adapter/: only emptying removes it
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == [1, 2]  # a fresh run's metrics only
    assert json.loads((out / "summary.json").read_text())["status"] == "done"


def test_resume_on_a_finished_run_keeps_it(tmp_path, chat_file):
    out = tmp_path / "run"
    assert sft(out, chat_file) == 0
    adapter = plant_stale(out)[1]
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert sft(out, chat_file, "--resume") == 0
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before  # the first run's steps are kept verbatim (timings included), not redone
    assert adapter.exists()  # resume empties nothing (Hugging Face itself replaces old shards in model/)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert sft(out, chat_file, "--resume", "--overwrite") == 2  # contradictory: refused


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
def test_a_folder_that_is_not_a_run_is_never_touched(tmp_path, chat_file, capsys, flags):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "model" / "weights.bin").write_text("mine")
    assert sft(out, chat_file, *flags) == 2
    assert "is not empty and is not a tether run folder" in capsys.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["model", "model/weights.bin", "notes.txt"]


def test_an_unfinished_run_with_nothing_to_resume_starts_clean(tmp_path):
    """A crash before the first checkpoint leaves config.yaml and some metrics: a fresh run empties the
    folder (there is no work to lose) instead of appending to them."""
    out = tmp_path / "run"
    cfg = load_config(EvalConfig, None, {"out": str(out)})
    Run(out, cfg, report_to="none").log(1, {"x": 1.0})
    (out / "leftover.txt").write_text("old")
    Run(out, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_evaluations_and_label_follow_the_same_rule(tmp_path):
    """No --resume or --overwrite flag for them: `--set overwrite=true` replaces a finished run; label
    continues its own run of the same config (its samples) and refuses one of another config."""
    out = tmp_path / "eval"
    cfg = load_config(EvalConfig, None, {"out": str(out)})
    Run(out, cfg).finish({"status": "done"})
    with pytest.raises(TetherError, match=r"holds a finished run: pass --set overwrite=true to replace it"):
        Run(out, cfg)
    assert (out / "summary.json").exists()
    Run(out, load_config(EvalConfig, None, {"out": str(out), "overwrite": True}))
    assert not (out / "summary.json").exists()

    lab = tmp_path / "label"
    first = load_config(LabelConfig, None, {"out": str(lab)})
    Run(lab, first, continues=True)
    (lab / "samples-train.jsonl").write_text("{}\n")
    Run(lab, first, continues=True).finish({"status": "done"})  # same config: continued, samples kept
    assert (lab / "samples-train.jsonl").exists()
    other = load_config(LabelConfig, None, {"out": str(lab), "seed": 1})
    with pytest.raises(TetherError, match="holds a run of another config"):
        Run(lab, other, continues=True)
    assert (lab / "samples-train.jsonl").exists()
    Run(lab, load_config(LabelConfig, None, {"out": str(lab), "seed": 1, "overwrite": True}), continues=True)
    assert sorted(p.name for p in lab.iterdir()) == ["config.yaml"]
    Run(lab, other, continues=True)  # the overwrite switch alone does not make another config


def test_length_grouped_micro_batches_cover_each_epoch_once_with_little_padding():
    """group_by_length: every epoch still visits each item exactly once, in an order that is a pure function
    of (seed, k); micro-batches hold similar lengths (far less padding than random batches)."""
    import random

    from tether.runloop import micro_batch

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(203)]
    items = list(range(203))
    per_epoch = 26  # ceil(203 / 8)

    def padding(batches):
        return sum(len(b) * max(lengths[j] for j in b) - sum(lengths[j] for j in b) for b in batches)

    for epoch in (0, 1):
        grouped = [micro_batch(items, epoch * per_epoch + i, 8, 3, lengths) for i in range(per_epoch)]
        plain = [micro_batch(items, epoch * per_epoch + i, 8, 3) for i in range(per_epoch)]
        assert sorted(j for b in grouped for j in b) == items
        assert padding(grouped) < 0.2 * padding(plain)
        assert [len(b) for b in grouped].count(3) == 1  # the one short micro-batch (203 = 25 * 8 + 3)
    assert micro_batch(items, 5, 8, 3, lengths) == micro_batch(items, 5, 8, 3, lengths)
    assert micro_batch(items, 5, 8, 3, lengths) != micro_batch(items, 5, 8, 4, lengths)
    firsts = [max(lengths[j] for j in micro_batch(items, i, 8, 3, lengths)) for i in range(per_epoch)]
    assert firsts != sorted(firsts, reverse=True)  # micro-batches run in shuffled order, not longest first
