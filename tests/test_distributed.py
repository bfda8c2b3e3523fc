"""Data parallelism (tether.distributed): trainers launched by torchrun on 2 CPU processes (gloo), under DDP
and FSDP2, take the optimizer steps one process takes on the same global batch; only rank 0 writes; an interrupted 2-process
run resumes exactly; global-batch statistics; bad launches get clear errors.

Each 2-process run goes through tests/dist_entry.py (`tether` plus test-only hooks: an audit of every
write the other ranks attempt under the run folder, and a SIGTERM sent by one rank to itself)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, write_jsonl
from tether import distributed
from tether.config import DirectConfig, PPOConfig, RMConfig, SFTConfig, load_config
from tether.errors import TetherError
from tether.losses import rl
from tether.stages import direct, ppo, rm, sft
from test_direct import pair_rows

TESTS = Path(__file__).parent
SFT_FLAGS = {"model.name": "builtin:tiny", "model.dtype": "fp32", "train.max_steps": 4, "train.batch_size": 4,
             "train.grad_accum": 2, "train.lr": 1e-3, "train.report_to": "none", "train.save_every": 0,
             "data.eval_fraction": 0.1}
DPO_FLAGS = {"model.name": "builtin:tiny", "model.dtype": "fp32", "train.max_steps": 3, "train.batch_size": 4,
             "train.lr": 1e-3, "train.report_to": "none", "train.save_every": 0, "data.eval_fraction": 0.2}
PPO_FLAGS = {"model.name": "builtin:tiny", "model.dtype": "fp32", "task.name": "builtin:instruct", "task.num_prompts": 8,
             "train.report_to": "none", "train.max_steps": 3, "train.lr": 3e-3, "train.save_every": 0,
             "rollout.prompts_per_step": 4, "rollout.max_new_tokens": 12, "ppo.minibatch_size": 2, "ppo.epochs": 2,
             "ppo.adaptive_kl": True, "eval_prompts": 4, "reward.function": "test_ppo:lowercase_share",
             "reward.missing_eos_penalty": 0.0, "reward.score_truncated": True}


def launch(tmp_path, command: str, flags: dict, nproc: int = 2, env: dict | None = None, check: bool = True):
    """`tether COMMAND --set k=v ...` on `nproc` processes under torchrun; returns the CompletedProcess."""
    sets = [a for k, v in flags.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TESTS / "dist_entry.py"), command, *sets]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} on {nproc} processes failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def audited(tmp_path, out: Path) -> dict:
    """Environment for `launch`: ranks > 0 record every write under `out` to tmp_path/writes.rank<r>."""
    return {"TETHER_TEST_WATCH": str(out), "TETHER_TEST_WRITES": str(tmp_path / "writes")}


def writes_by_other_ranks(tmp_path) -> list[str]:
    return [line for f in tmp_path.glob("writes.rank*") for line in f.read_text().splitlines()]


def max_difference(a: Path, b: Path) -> float:
    """Largest weight difference between two runs' OUT/model (or two model folders)."""
    file = lambda d: d / "model.safetensors" if (d / "model.safetensors").exists() else d / "model" / "model.safetensors"  # noqa: E731
    x, y = load_file(str(file(a))), load_file(str(file(b)))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(one: Path, two: Path, keys=None, rel: float = 1e-4) -> None:
    """Every logged number (timings aside) equal, step by step, between the two runs, to float rounding (a
    statistic of one rank's rows instead of the global batch's is off by percents, not 1e-4)."""
    a, b = metric_rows(one), metric_rows(two)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for k, v in x.items():
            if isinstance(v, float) and not k.startswith(("time/", "throughput/", "train/tokens_per_s")) and (keys is None or k in keys):
                assert y[k] == pytest.approx(v, rel=rel, abs=1e-6), (x["step"], k)


def test_sft_and_dpo_on_two_processes_equal_one_and_only_rank_0_writes(tmp_path, chat_file):
    one = tmp_path / "sft-one"
    sft.train(load_config(SFTConfig, None, SFT_FLAGS | {"data.path": str(chat_file), "train.out": str(one)}))
    two = tmp_path / "sft-two"
    launch(tmp_path, "sft", SFT_FLAGS | {"data.path": chat_file, "train.out": two}, env=audited(tmp_path, two))
    assert max_difference(one, two) < 1e-5
    assert_same_metrics(one, two)  # the logged loss, eval loss, gradient norm: the global batch's
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert writes_by_other_ranks(tmp_path) == []
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    one = tmp_path / "dpo-one"
    direct.train(direct.with_method(load_config(DirectConfig, None, DPO_FLAGS | {"data.path": str(pairs), "train.out": str(one)}), "dpo"))
    two = tmp_path / "dpo-two"
    launch(tmp_path, "dpo", DPO_FLAGS | {"data.path": pairs, "train.out": two}, env=audited(tmp_path, two))
    assert max_difference(one, two) < 1e-5
    assert_same_metrics(one, two)  # rewards/accuracies, margins, logps: over both ranks' pairs
    assert writes_by_other_ranks(tmp_path) == []
    # the reference log-probs, computed half on each rank, are the single process's
    ref_one, ref_two = load_file(str(one / direct.CACHE)), load_file(str(two / direct.CACHE))
    assert all(torch.allclose(ref_one[k], ref_two[k], atol=1e-5) for k in ref_one)


@pytest.mark.parametrize("command", ["rm", "kto", "orpo"])
def test_every_other_trainer_on_two_processes_equals_one(tmp_path, command):
    """The reward model (an ensemble of two: members in turn, the manifest written once), KTO (its z0 over both
    ranks' mismatched pairs) and ORPO on 2 processes take the single process's steps."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    flags = DPO_FLAGS | {"data.path": pairs} | ({"ensemble": 2} if command == "rm" else {})
    one, two = tmp_path / "one", tmp_path / "two"
    if command == "rm":
        rm.train(load_config(RMConfig, None, flags | {"data.path": str(pairs), "train.out": str(one)}))
    else:
        direct.train(direct.with_method(load_config(DirectConfig, None, flags | {"data.path": str(pairs), "train.out": str(one)}), command))
    launch(tmp_path, command, flags | {"train.out": two}, env=audited(tmp_path, two))
    if command == "rm":
        for m in ("member-0", "member-1"):
            assert max_difference(one / "model" / m, two / "model" / m) < 1e-5
        e1, e2 = (json.loads((d / "model" / "ensemble.json").read_text()) for d in (one, two))
        assert e1.keys() == e2.keys() and e1["members"] == e2["members"]
        assert e2["reward_mean"] == pytest.approx(e1["reward_mean"], abs=1e-5) and e2["reward_std"] == pytest.approx(e1["reward_std"], abs=1e-5)
        assert_same_metrics(one / "members" / "m1", two / "members" / "m1")
    else:
        assert max_difference(one, two) < 1e-5
        assert_same_metrics(one, two)
    assert writes_by_other_ranks(tmp_path) == []


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_ppo_on_two_processes_equals_one_with_global_statistics(tmp_path, algo):
    """Each rank samples its own prompts (seeded per global row), yet the parameters and every logged statistic
    equal the single process's: the whitening mean/std (advantages/*_raw), the group baselines
    (advantages/abs_mean), the KL controller's input (objective/kl) and its output (kl/beta), the early-stop
    approx KL, the critic's explained variance, the held-out score."""
    flags = PPO_FLAGS | ({"ppo.algo": "grpo", "rollout.group_size": 2, "ppo.minibatch_size": 4} if algo == "grpo" else {})
    one = tmp_path / "one"
    ppo.train(load_config(PPOConfig, None, flags | {"train.out": str(one)}))
    two = tmp_path / "two"
    launch(tmp_path, "ppo", flags | {"train.out": two}, env=audited(tmp_path, two))
    assert max_difference(one, two) < 1e-5
    statistics = {"advantages/mean_raw", "advantages/std_raw", "advantages/abs_mean", "objective/kl", "kl/beta",
                  "objective/scores", "policy/approxkl", "response/length_mean", "eval/score"}
    rows = [m for m in metric_rows(one) if "objective/kl" in m]
    assert rows and all(k in rows[0] for k in statistics - {"eval/score"})
    assert len({m["kl/beta"] for m in rows}) == len(rows)  # the adaptive controller moved beta every iteration
    assert_same_metrics(one, two)
    assert writes_by_other_ranks(tmp_path) == []


FSDP = {"ACCELERATE_USE_FSDP": "true"}  # what `accelerate launch --config_file src/tether/launch/fsdp2.yaml` sets


@pytest.mark.parametrize("command,env", [("sft", {}), ("ppo", {}), ("sft", FSDP)], ids=["sft", "ppo", "sft-fsdp2"])
def test_two_process_run_interrupted_on_rank_1_resumes_exactly(tmp_path, chat_file, command, env):
    """SIGTERM on rank 1 only: both ranks checkpoint at the same step and stop; --resume on 2 processes then
    ends where a straight run ends (under FSDP2 the checkpoint holds the gathered weights and optimizer state,
    sharded again on resume)."""
    if command == "sft":
        flags = SFT_FLAGS | {"data.path": chat_file}
        straight = tmp_path / "straight"
        sft.train(load_config(SFTConfig, None, flags | {"data.path": str(chat_file), "train.out": str(straight)}))
    else:
        flags = PPO_FLAGS | {"eval_prompts": 0}
        straight = tmp_path / "straight"
        ppo.train(load_config(PPOConfig, None, flags | {"train.out": str(straight)}))
    out = tmp_path / "resumed"
    proc = launch(tmp_path, command, flags | {"train.out": out}, env={"TETHER_TEST_SIGTERM": "1:2", **env}, check=False)
    assert proc.returncode != 0 and "SIGTERM received" in proc.stderr
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002"] and not (out / "summary.json").exists()
    launch(tmp_path, command, flags | {"train.out": out, "train.resume": "true"}, env=env)
    assert max_difference(straight, out) < 1e-5
    assert_same_metrics(straight, out)


def test_a_two_process_checkpoint_resumes_on_one_process(tmp_path, chat_file):
    """Checkpoints do not depend on the world size: a 2-process SFT run stopped at step 2 continues in one
    process (any W dividing the batch would do) and ends where a straight run ends."""
    flags = SFT_FLAGS | {"data.path": str(chat_file)}
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    sft.train(load_config(SFTConfig, None, flags | {"train.out": str(straight)}))
    proc = launch(tmp_path, "sft", flags | {"train.out": out}, env={"TETHER_TEST_SIGTERM": "0:2"}, check=False)
    assert proc.returncode != 0 and (out / "checkpoints" / "step-00000002").is_dir()
    sft.train(load_config(SFTConfig, None, flags | {"train.out": str(out), "train.resume": True}))
    assert max_difference(straight, out) < 1e-5
    assert_same_metrics(straight, out)


def test_fsdp2_sft_and_ppo_equal_one_and_save_one_hugging_face_folder(tmp_path, chat_file):
    """FSDP2 (torch's fully_shard, decoder layers as shard groups; gloo here, NCCL on GPUs): the same optimizer
    steps as one process, only rank 0 writes, and OUT/model is one ordinary folder gathered from the shards."""
    from transformers import AutoModelForCausalLM

    one = tmp_path / "sft-one"
    sft.train(load_config(SFTConfig, None, SFT_FLAGS | {"data.path": str(chat_file), "train.out": str(one)}))
    two = tmp_path / "sft-fsdp"
    launch(tmp_path, "sft", SFT_FLAGS | {"data.path": chat_file, "train.out": two}, env={**FSDP, **audited(tmp_path, two)})
    assert max_difference(one, two) < 1e-5
    assert load_file(str(two / "model" / "model.safetensors")).keys() == load_file(str(one / "model" / "model.safetensors")).keys()
    assert AutoModelForCausalLM.from_pretrained(two / "model").config.num_hidden_layers == 2
    assert_same_metrics(one, two)
    assert writes_by_other_ranks(tmp_path) == []

    one, two = tmp_path / "ppo-one", tmp_path / "ppo-fsdp"
    ppo.train(load_config(PPOConfig, None, PPO_FLAGS | {"train.out": str(one)}))
    launch(tmp_path, "ppo", PPO_FLAGS | {"train.out": two}, env=FSDP)  # policy and critic sharded; the engine gathers
    assert max_difference(one, two) < 1e-5
    assert_same_metrics(one, two)


def test_whitening_and_statistics_over_ranks_equal_the_whole_batch():
    """With two ranks holding the same rows, the all-reduce doubles every sum: all_sum(t) = 2 t. The global
    statistics must then be those of the whole (duplicated) batch."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.3).float()
    twice = lambda t: 2 * t  # noqa: E731
    whole = rl.masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:3]
    assert torch.allclose(rl.masked_whiten(x, mask, all_sum=twice), whole, atol=1e-6)
    assert not torch.allclose(rl.masked_whiten(x, mask), whole, atol=1e-4)  # the rank's own statistics differ
    mean, var = rl.masked_moments(x, mask, twice)
    both = torch.cat([x, x])[torch.cat([mask, mask]).bool()]
    assert mean.item() == pytest.approx(both.mean().item(), abs=1e-6) and var.item() == pytest.approx(both.var().item(), abs=1e-6)
    values, returns = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    ev = ppo.explained_variance(values, returns, mask, twice)
    assert ev == pytest.approx(ppo.explained_variance(torch.cat([values, values]), torch.cat([returns, returns]), torch.cat([mask, mask])), abs=1e-6)
    # a token-mean loss normalised by the global count: the two shares sum to the whole batch's mean
    share = rl.aggregate(x, mask, "token", total=2 * mask.sum())
    assert (2 * share).item() == pytest.approx(rl.masked_mean(torch.cat([x, x]), torch.cat([mask, mask])).item(), abs=1e-6)


@pytest.mark.parametrize("world_size,group", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_minibatches_do_not_depend_on_the_world_size(world_size, group):
    """losses.rl.minibatch_partition: every minibatch takes the same number of rows from every rank (ranks own
    whole prompt groups, g = rank mod W), whatever W is, and the partition covers every row once."""
    n_groups, mb = 8, 4 * group
    parts = rl.minibatch_partition(n_groups * group, mb, torch.Generator().manual_seed(3))
    assert sorted(torch.cat(parts).tolist()) == list(range(n_groups * group))
    for part in parts:
        owners = [(r // group) % world_size for r in part.tolist()]
        assert all(owners.count(k) == mb // world_size for k in range(world_size)), owners
    again = rl.minibatch_partition(n_groups * group, mb, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    others = [rl.minibatch_partition(n_groups * group, mb, torch.Generator().manual_seed(s)) for s in range(4, 8)]
    assert any(not torch.equal(a, b) for other in others for a, b in zip(parts, other))  # each epoch a new draw


def test_seeded_sampling_does_not_depend_on_the_batch():
    """Engine.generate(seeds=...): a response depends on its prompt and seed only, not on the prompts it is
    batched with (data-parallel ranks sample different subsets)."""
    from tether.engine import Engine, counter_uniform
    from tether.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    engine = Engine(load_causal_lm("builtin:tiny"), tok, torch.float32)
    # prompts of one length: the rows' logits are then bit-identical in any batch, and what is tested is the
    # random stream (with different left padding the logits may differ in the last bits, and so, rarely, a
    # draw that lands on a CDF boundary; the tiny random model's near-uniform 49k-token CDF has many)
    prompts = [tok(f"Question {i}: say something.")["input_ids"] for i in range(6)]
    assert len({len(p) for p in prompts}) == 1
    seeds = [11 * i + 5 for i in range(6)]
    every = engine.generate(prompts, 10, temperature=1.0, batch_size=6, seeds=seeds)
    half = engine.generate(prompts[1::2], 10, temperature=1.0, batch_size=2, seeds=seeds[1::2])
    assert half.response_ids == every.response_ids[1::2]
    other = engine.generate(prompts, 10, temperature=1.0, batch_size=6, seeds=[s + 1 for s in seeds])
    assert other.response_ids != every.response_ids
    draws = torch.cat([counter_uniform(torch.arange(2000), t) for t in range(5)])
    assert 0.0 <= draws.min() and draws.max() < 1.0 and abs(draws.mean().item() - 0.5) < 0.02


def test_bad_launches_get_clear_errors(tmp_path, chat_file, monkeypatch):
    # a global batch that does not split over the ranks
    proc = launch(tmp_path, "sft", SFT_FLAGS | {"data.path": chat_file, "train.out": tmp_path / "odd", "train.batch_size": 3}, check=False)
    assert proc.returncode != 0 and "train.batch_size=3 is not divisible by the world size 2" in proc.stderr
    proc = launch(tmp_path, "ppo", PPO_FLAGS | {"train.out": tmp_path / "p", "rollout.prompts_per_step": 3}, check=False)
    assert proc.returncode != 0 and "rollout.prompts_per_step=3 is not divisible by the world size 2" in proc.stderr
    # a stage that runs in one process
    proc = launch(tmp_path, "label", {"train.out": tmp_path / "l"}, check=False)
    assert proc.returncode != 0 and "tether label runs in one process" in proc.stderr
    # ZeRO-3 from an accelerate config without DeepSpeed installed (it is not, here)
    pytest.importorskip("accelerate")
    if distributed._env_true("ACCELERATE_USE_DEEPSPEED"):
        pytest.skip("launched under DeepSpeed")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(TetherError, match=r"DeepSpeed \(ZeRO stage 3\) but the 'deepspeed' package is not installed"):
        distributed.World()



def test_vllm_engine_without_vllm_or_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    import types

    cfg = load_config(PPOConfig, None, PPO_FLAGS | {"train.out": str(tmp_path / "v"), "rollout.engine": "vllm"})
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(TetherError, match=r"rollout.engine=vllm needs vLLM: pip install \"tether\[vllm\]\""):
            ppo.train(cfg)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # vLLM present, but no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TetherError, match="rollout.engine=vllm needs a CUDA GPU"):
        ppo.train(cfg)
    assert not (tmp_path / "v").exists()  # refused before anything was loaded or written


def test_truncated_importance_weights_by_hand():
    """w_t = min(exp(logp_trainer - logp_engine), cap), 0 on padding, no gradient; it scales the per-token PPO loss."""
    trainer = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    engine = torch.tensor([[-1.2, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    wts = rl.truncated_importance_weights(trainer, engine, mask, cap=1.1)
    assert torch.allclose(wts, torch.tensor([[1.1, torch.exp(torch.tensor(-1.0)).item(), 0.0]]))  # e^0.2 = 1.22 -> capped
    assert not wts.requires_grad
    logp, old, adv = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[1.0, -2.0, 3.0]])
    plain, _ = rl.ppo_policy_loss(logp, old, adv, mask)
    weighted, _ = rl.ppo_policy_loss(logp, old, adv, mask, weights=wts)
    assert plain.item() == pytest.approx((-1.0 + 2.0) / 2)  # ratio 1: L = -A per token, mean over 2 real tokens
    assert weighted.item() == pytest.approx((-1.0 * 1.1 + 2.0 * math.exp(-1.0)) / 2)
