import json
import os
import signal
import subprocess
import sys
import time

from conftest import write_jsonl
from tether.cli import main


def test_bad_data_is_one_line_exit_2(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}])
    code = main(["sft", "--model", "builtin:tiny", "--data", str(bad), "--out", str(tmp_path / "o"), "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"tether: error: {bad}, row 2, field 'completion': empty completion"
    assert "Traceback" not in err


def test_config_error_exit_2(tmp_path, capsys):
    code = main(["sft", "--model", "builtin:tiny", "--set", "train.warmup=3"])
    assert code == 2
    assert "unknown config key 'train.warmup' (from --set); did you mean 'train.warmup_steps'?" in capsys.readouterr().err


def test_unknown_model_exit_2(tmp_path, capsys, chat_file):
    code = main(["sft", "--model", "builtin:nope", "--data", str(chat_file), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "unknown builtin model 'builtin:nope'" in capsys.readouterr().err
    code = main(["sft", "--model", str(tmp_path / "no-such-folder"), "--data", str(chat_file), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "model folder not found" in capsys.readouterr().err


def test_env_prints_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("tether", "python", "torch", "transformers", "peft", "accelerate", "cpu features", "auto dtype"):
        assert key in out


def test_sigterm_checkpoints_then_resume_finishes(tmp_path, chat_file):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tether", "sft", "--model", "builtin:tiny", "--data", str(chat_file), "--out", str(out),
           "--max-steps", "5000", "--batch-size", "2", "--report-to", "none", "--set", "train.save_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("train/loss") < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved. Continue with --resume" in err
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not list((out / "checkpoints").glob(".tmp-*"))
    stopped_at = json.loads((ckpts[0] / "progress.json").read_text())["step"]
    assert stopped_at >= 3
    # resume, now with a budget that ends soon after the stop
    resumed = subprocess.run(cmd[:-2] + ["--set", "train.save_every=0", "--resume", "--max-steps", str(stopped_at + 2)],
                             capture_output=True, text=True, timeout=300, env={**os.environ})
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if "train/loss" in l]
    assert steps == list(range(1, stopped_at + 3))


def test_quickstart_pipeline_on_the_tiny_model(tmp_path, capsys):
    """The README's main command end to end (the --fast recipe with the tiny model in place of SmolLM2):
    every stage runs, the final table and the report appear; a second run skips every stage."""
    out = tmp_path / "qs"
    tiny = ["--set", "sft.model.name=builtin:tiny", "--set", "eval.models.base=builtin:tiny", "--set", "label.task.num_prompts=8",
            "--set", "eval.task.num_eval_prompts=8", "--set", "ppo.train.max_steps=2"]
    assert main(["quickstart", "--fast", "--out", str(out), *tiny]) == 0
    text = capsys.readouterr().out
    assert "gold" in text and all(m in text for m in ("base", "sft", "ppo")) and "KL to sft" in text
    state = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in state["stages"]] == ["sft", "label", "rm", "eval_rm", "ppo", "eval"]
    assert all(s["status"] == "done" for s in state["stages"])
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"base", "sft", "ppo"} and results["models"]["ppo"]["kl"] is not None
    html = (out / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert main(["quickstart", "--fast", "--out", str(out), *tiny]) == 0
    assert all(s.get("skipped") for s in json.loads((out / "pipeline.json").read_text())["stages"])


def test_print_config_is_the_resolved_config_with_comments(tmp_path, capsys):
    """--print-config: YAML that loads back to exactly the resolved config (flags and --set included), each key
    with its comment and choices; nothing runs and nothing is written."""
    import yaml

    from tether.config import PPOConfig, load_config, to_dict

    out = tmp_path / "never"
    code = main(["ppo", "--algo", "rloo", "--kl-coef", "0.2", "--prompts", "p.jsonl", "--out", str(out),
                 "--set", "rollout.group_size=3", "--print-config"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    want = load_config(PPOConfig, None, {"ppo.algo": "rloo", "ppo.kl_coef": 0.2, "data.path": "p.jsonl", "train.out": str(out)},
                       ["rollout.group_size=3"])
    assert yaml.safe_load(text) == to_dict(want)
    lines = text.splitlines()
    assert "  algo: rloo  # [ppo | grpo | rloo | reinforce]" in lines
    assert "  kl_coef: 0.2  # beta" in lines
    assert any(x.startswith("  max_grad_norm: 1.0  # clip the global gradient norm to this; 0 = no clipping") for x in lines)
    assert any(x.startswith("  min_agreement: 0.0  # preference data: train only on pairs") for x in
               capsys.readouterr().out.splitlines() + _printed(["rm", "--print-config"], capsys))
    # the printed config is a valid --config file: it reproduces the same config
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert load_config(PPOConfig, path) == want


def _printed(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_ppo_help_names_the_algorithms_and_flags(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("--algo {ppo,grpo,rloo,reinforce}", "--reward-model", "--reward-fn", "--prompts FILE", "--eval-prompts FILE",
                 "--kl-coef", "grpo: group-normalised", "rloo: leave-one-out", "reinforce: batch-mean"):
        assert word in text, word
