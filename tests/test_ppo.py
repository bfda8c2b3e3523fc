"""PPO on the tiny model: the exact first ratio, which weights may move, the critic's placement, a reward
model with another tokenizer, learning a simple reward (PPO, GRPO, RLOO), exact resume, and the options."""

import json

import pytest
import torch

from tether.config import PPOConfig, load_config
from tether.errors import TetherError
from tether.models import load_causal_lm
from tether.stages import ppo
from tether.tasks import Gold, Prompt, Task


def lowercase_share(prompt: str, response: str) -> float:
    """A simple Python reward: the share of response characters that are a-z."""
    return sum("a" <= c <= "z" for c in response) / max(1, len(response))


def ppo_cfg(tmp_path, name="ppo", **flags):
    base = {"model.name": "builtin:tiny", "model.dtype": "fp32", "task.name": "test_tasks:EchoTask", "train.out": str(tmp_path / name),
            "train.report_to": "none", "train.max_steps": 2, "train.lr": 3e-3, "train.save_every": 0,
            "rollout.prompts_per_step": 6, "rollout.max_new_tokens": 12, "rollout.batch_size": 16,
            "ppo.minibatch_size": 6, "ppo.epochs": 2, "eval_prompts": 0, "sample_every": 1,
            "reward.missing_eos_penalty": 0.0, "reward.score_truncated": True}
    base.update(flags)
    return load_config(PPOConfig, None, base)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_first_ratio_is_one_and_only_policy_and_critic_move(tmp_path):
    """LoRA: one base serves policy, reference (adapters off) and critic (its own adapter + head)."""
    from transformers import AutoModelForCausalLM

    seen = {}
    cfg = ppo_cfg(tmp_path, **{"model.lora_r": 4, "train.max_steps": 1})
    ppo.train(cfg, reward_fn=lowercase_share, on_step=lambda it, run, modules: seen.update(modules=modules))
    m = [x for x in metrics(tmp_path / "ppo") if "policy/ratio_first_mb" in x][0]
    assert m["policy/ratio_first_mb"] == pytest.approx(1.0, abs=1e-5)
    assert m["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    fresh = load_causal_lm("builtin:tiny").state_dict()
    policy, critic = seen["modules"]["policy"], seen["modules"]["critic"]
    assert isinstance(critic, ppo.SharedCritic) and sorted(n for n, _ in critic.named_parameters()) == ["head.bias", "head.weight"]
    moved = {"default": 0, "critic": 0}
    for name, p in policy.named_parameters():
        if "lora_" in name:
            assert p.requires_grad, name
            moved[name.split(".")[-2]] += "lora_B" in name and not torch.equal(p, torch.zeros_like(p))
        else:  # the base = the reference (adapters disabled): bit-identical, and not trainable
            assert not p.requires_grad
            assert torch.equal(p.detach(), fresh[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
    assert moved["default"] > 0 and moved["critic"] > 0, moved
    for key in ("objective/scores", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "policy/approxkl",
                "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "val/explained_variance", "kl/beta",
                "response/length_mean", "response/eos_rate", "time/generate", "time/score", "time/train", "throughput/tokens_per_s"):
        assert key in m, key
    out = tmp_path / "ppo"
    assert (out / "samples.jsonl").exists()
    # the saved model is the policy alone: the critic adapter is neither merged in nor saved beside it
    assert not (out / "adapter" / "critic").exists()
    ids = torch.tensor([[1, 504, 2683, 314, 260, 2]])
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, policy(input_ids=ids).logits, atol=1e-5)


def test_policy_forward_reads_log_probs_and_values_off_one_pass():
    """policy_forward runs the LM head on real response positions only; there its log-probs equal the
    full-logits computation, beyond a response's length they (and the entropy) are 0; its values equal the
    value head applied to the last hidden state."""
    from tether.rollout import policy_forward

    torch.manual_seed(0)
    model = load_causal_lm("builtin:tiny").eval()
    batch = {"query_ids": torch.tensor([[2, 2, 504, 2683], [1, 314, 260, 77]]), "query_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
             "response_ids": torch.tensor([[88, 99, 2], [120, 2, 2]]), "lengths": torch.tensor([3, 2])}
    head = ppo.ValueHead(model.config.hidden_size)
    with torch.no_grad():
        logp, ent, values = policy_forward(model, batch, 0.7, with_entropy=True, value_head=head)
        ids = torch.cat([batch["query_ids"], batch["response_ids"]], 1)
        mask = torch.cat([batch["query_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]])], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        want = torch.log_softmax(out.logits[:, 3:-1] / 0.7, -1).gather(-1, batch["response_ids"][..., None])[..., 0]
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, 3:-1]
    real = torch.tensor([[True, True, True], [True, True, False]])
    assert torch.allclose(logp[real], want[real], atol=1e-5) and logp[~real].eq(0).all()
    assert torch.allclose(values[real], head(hidden)[..., 0][real], atol=1e-5)
    p = torch.softmax(out.logits[:, 3:-1] / 0.7, -1)
    want_ent = -(p * p.log()).sum(-1)
    assert torch.allclose(ent[real], want_ent[real], atol=1e-4) and ent[~real].eq(0).all()


def test_trimming_a_minibatchs_padding_keeps_every_log_prob_and_value():
    """trim_padding drops the columns that are padding in every row of a minibatch (queries' shared left
    padding, responses past the longest); each real token's log-prob and value are unchanged."""
    from tether.rollout import policy_forward, trim_padding

    model = load_causal_lm("builtin:tiny").eval()
    head = ppo.ValueHead(model.config.hidden_size)
    batch = {"query_ids": torch.tensor([[2, 2, 2, 504, 2683], [2, 2, 1, 314, 260]]),
             "query_mask": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]),
             "response_ids": torch.tensor([[88, 99, 2, 2, 2], [120, 2, 2, 2, 2]]), "lengths": torch.tensor([3, 2])}
    batch["mask"] = (torch.arange(5)[None] < batch["lengths"][:, None]).float()
    small, T = trim_padding(batch)
    assert T == 3 and small["query_ids"].shape == (2, 3) and small["response_ids"].shape == (2, 3) and small["mask"].shape == (2, 3)
    with torch.no_grad():
        a = policy_forward(model, batch, 1.0, value_head=head)
        b = policy_forward(model, small, 1.0, value_head=head)
    assert torch.allclose(a[0][:, :T], b[0], atol=1e-5) and a[0][:, T:].eq(0).all()
    real = batch["mask"][:, :T].bool()
    assert torch.allclose(a[2][:, :T][real], b[2][real], atol=1e-5)


def test_value_head_critic_trains_head_and_policy_adapter_only(tmp_path):
    """critic_backbone=head: one forward per minibatch gives log-probs and values; the head and the
    policy's adapter move, the base does not, and the first ratio is still exactly 1."""
    seen = {}
    cfg = ppo_cfg(tmp_path, **{"model.lora_r": 4, "train.max_steps": 2, "ppo.critic_backbone": "head"})
    ppo.train(cfg, reward_fn=lowercase_share, on_step=lambda it, run, modules: seen.setdefault(it, {
        n: p.detach().clone() for n, p in modules.named_parameters()}) and seen.update(modules=modules))
    ms = [x for x in metrics(tmp_path / "ppo") if "policy/ratio_first_mb" in x]
    assert ms[0]["policy/ratio_first_mb"] == pytest.approx(1.0, abs=1e-5)
    assert all("loss/value" in m and "val/explained_variance" in m for m in ms)
    critic = seen["modules"]["critic"]
    assert isinstance(critic, ppo.ValueHead) and sorted(n for n, _ in critic.named_parameters()) == ["head.bias", "head.weight"]
    first, second = seen[1], seen[2]
    assert not torch.equal(first["critic.head.weight"], second["critic.head.weight"])
    assert any("lora_B" in n and not torch.equal(first[n], second[n]) for n in first)
    assert all(torch.equal(first[n], second[n]) for n in first if "lora_" not in n and "critic." not in n)
    assert all(".critic." not in n for n in first)  # no second adapter


def test_length_debiased_reward_subtracts_the_linear_length_term(tmp_path):
    """reward.length_slope: the RM's score minus slope * (characters - center), before normalising."""
    from tether.models import load_reward_model, save_pretrained

    rm, rtok = load_reward_model("builtin:tiny")
    save_pretrained(rm, rtok, tmp_path / "rm")
    prompts = [Prompt(str(i), [{"role": "user", "content": "Say hi."}], {}) for i in range(3)]
    texts = ["hi", "hello there", "hello there, how are you today?"]
    plain = ppo.Scorer(ppo_cfg(tmp_path, **{"reward.model": str(tmp_path / "rm" / "model"), "reward.normalize": "none"}),
                       None, "cpu", torch.float32)
    debiased = ppo.Scorer(ppo_cfg(tmp_path, **{"reward.model": str(tmp_path / "rm" / "model"), "reward.normalize": "none",
                                                "reward.length_slope": 0.05, "reward.length_center": 10.0}), None, "cpu", torch.float32)
    a, _ = plain(prompts, texts, [True] * 3)
    b, _ = debiased(prompts, texts, [True] * 3)
    want = a - 0.05 * (torch.tensor([2.0, 11.0, 31.0]) - 10.0)
    assert torch.allclose(b, want, atol=1e-5)


def test_separate_critic_with_lora_has_its_own_copy(tmp_path):
    seen = {}
    cfg = ppo_cfg(tmp_path, **{"model.lora_r": 4, "train.max_steps": 1, "ppo.critic_backbone": "separate"})
    ppo.train(cfg, reward_fn=lowercase_share, on_step=lambda it, run, modules: seen.update(modules=modules))
    policy, critic = seen["modules"]["policy"], seen["modules"]["critic"]
    assert isinstance(critic, ppo.SeparateCritic)
    assert all(".critic." not in n for n, _ in policy.named_parameters())
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in critic.named_parameters())
    with pytest.raises(TetherError, match="needs LoRA"):
        ppo.train(ppo_cfg(tmp_path, "full", **{"model.lora_r": 0, "ppo.critic_backbone": "shared"}), reward_fn=lowercase_share)


def other_tokenizer_rm(folder):
    """A tiny reward model whose tokenizer shares nothing with SmolLM2's: a 300-token BPE with its own
    special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox says hello", "USER: ASSISTANT: answer in lower case", "Prompt number one two three"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}</s>{% endfor %}"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model_with_a_different_tokenizer(tmp_path, caplog):
    """The RM sees the decoded text re-tokenised with its own tokenizer and template; the critic, which
    reads the policy's tokens, then starts from the policy instead of the RM."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tether.tasks import load_task

    folder = other_tokenizer_rm(tmp_path / "rm")
    cfg = ppo_cfg(tmp_path, **{"reward.model": str(folder), "reward.normalize": "none", "model.lora_r": 4, "train.max_steps": 1})
    task = load_task("test_tasks:EchoTask")
    prompts = task.prompts("train")[:2]
    texts = ["hello fox", "the answer is three, said the quick brown fox"]
    scores, _ = ppo.Scorer(cfg, task, torch.device("cpu"), torch.float32)(prompts, texts, [True, True])
    rm, rm_tok = AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    for p, text, s in zip(prompts, texts, scores):
        conv = p.messages + [{"role": "assistant", "content": text}]
        ids = rm_tok(rm_tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids.max() < 300 and ids[0, -1] == rm_tok.eos_token_id
        with torch.no_grad():
            assert s.item() == pytest.approx(rm(ids).logits[0, 0].item(), abs=1e-5)
    seen = {}
    with caplog.at_level("WARNING", logger="tether"):
        s = ppo.train(cfg, on_step=lambda it, run, modules: seen.update(modules=modules))
    assert s["status"] == "done" and isinstance(seen["modules"]["critic"], ppo.SharedCritic)
    assert "tokenizer differs" in caplog.text


WORDS = ("apple", "river", "stone", "cloud")


def apple_share(prompt: str, response: str) -> float:
    """'Reward the token X': the share of response words that are 'apple'."""
    words = response.split()
    return sum(w == "apple" for w in words) / max(1, len(words))


@pytest.fixture(scope="module")
def word_policy(tmp_path_factory):
    """A tiny model SFT'd to answer with 2-5 of four words: RL starts from an SFT model, as in RLHF
    (a random 49k-token model would almost never sample the rewarded token)."""
    import random

    from conftest import chat, tiny_cfg, write_jsonl
    from tether.stages import sft

    tmp = tmp_path_factory.mktemp("words")
    rng = random.Random(0)
    rows = [chat(f"Say {w}.", " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))))
            for w in ("yes", "no", "maybe") for _ in range(40)]
    s = sft.train(tiny_cfg(tmp, write_jsonl(tmp / "words.jsonl", rows), "sft",
                           **{"train.max_steps": 30, "train.lr": 1e-2, "train.batch_size": 16, "data.eval_fraction": 0.05}))
    return s["model"]


# EchoTask has 3 prompts: 4 samples of each give every algorithm 12 sequences per iteration
@pytest.mark.parametrize("algo,group", [("ppo", 4), ("grpo", 4), ("rloo", 4), ("reinforce", 4)])
def test_algorithms_raise_a_simple_reward(tmp_path, word_policy, algo, group):
    cfg = ppo_cfg(tmp_path, algo, **{"model.name": word_policy, "ppo.algo": algo, "rollout.group_size": group,
                                     "rollout.prompts_per_step": 16 // group, "train.max_steps": 10, "ppo.minibatch_size": 8,
                                     "ppo.kl_coef": 0.01, "ppo.vf_coef": 0.5, "model.lora_r": 0, "rollout.max_new_tokens": 16,
                                     "reward.score_truncated": False})
    ppo.train(cfg, reward_fn=apple_share)
    scores = [m["objective/scores"] for m in metrics(tmp_path / algo) if "objective/scores" in m]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.15, scores


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A tiny random reward model folder with the policy's tokenizer."""
    from tether.models import load_reward_model, save_pretrained

    rm, rtok = load_reward_model("builtin:tiny")
    return str(save_pretrained(rm, rtok, tmp_path_factory.mktemp("rm")))


# full fine-tuning (separate critic), LoRA (shared-base critic), LoRA with a value head on the policy, and a
# reward model whose scores are normalised by running statistics (which the checkpoint must carry)
@pytest.mark.parametrize("lora_r,backbone,running", [(0, "auto", False), (4, "auto", False), (4, "head", False), (4, "head", True)])
def test_interrupt_and_resume_equals_straight_run(tmp_path, lora_r, backbone, running, tiny_rm):
    from safetensors.torch import load_file

    flags = {"train.max_steps": 3, "model.lora_r": lora_r, "ppo.grad_accum": 2, "ppo.minibatch_size": 3,
             "ppo.critic_backbone": backbone}
    if running:
        flags |= {"reward.model": tiny_rm, "reward.normalize": "running", "ppo.critic_init": "policy"}
    ppo.train(ppo_cfg(tmp_path, "straight", **flags), reward_fn=lowercase_share)

    def interrupt(it, run, modules):
        if it == 1:
            run.stop_requested = True

    part = ppo.train(ppo_cfg(tmp_path, "resumed", **flags), reward_fn=lowercase_share, on_step=interrupt)
    assert part == {"status": "interrupted", "step": 1}
    ppo.train(ppo_cfg(tmp_path, "resumed", **flags, **{"train.resume": True}), reward_fn=lowercase_share)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in metrics(tmp_path / "resumed") if "objective/scores" in m]
    assert steps == [1, 2, 3]


def test_options_adaptive_kl_ptx_running_norm_kl_loss(tmp_path, tiny_rm):
    """The less common switches run and do what they say on a short tiny run."""
    from tether.losses import rl

    cfg = ppo_cfg(tmp_path, "opts", **{"train.max_steps": 2, "model.lora_r": 4, "ppo.adaptive_kl": True, "ppo.kl_target": 0.5,
                                        "ppo.kl_horizon": 10, "ppo.ptx_coef": 0.5, "ppo.kl_in_reward": False,
                                        "ppo.critic_warmup_steps": 1, "reward.clip": 0.3, "ppo.kl_estimator": "k3",
                                        "reward.model": tiny_rm, "reward.normalize": "running", "ppo.critic_init": "policy"})
    s = ppo.train(cfg, reward_fn=lowercase_share)
    ms = [m for m in metrics(tmp_path / "opts") if "objective/scores" in m]
    # the warm-up iteration trains the critic only: no ptx and no KL loss term
    assert all("loss/ptx" in m and "loss/kl" in m for m in ms[1:]) and "loss/ptx" not in ms[0] and "loss/kl" not in ms[0]
    progress = json.loads(next((tmp_path / "opts" / "checkpoints").glob("step-*/progress.json")).read_text())
    assert len(progress["reward_running"]) == 1  # one (count, mean, M2) per reward model
    assert progress["reward_running"][0][0] == 2 * 3  # Welford's count: every RM score of both rollouts (3 prompts each)
    assert all(abs(m["objective/scores"]) <= 0.3 + 1e-6 for m in ms)          # reward clipping
    # the controller moved beta from its start as Ziegler et al.'s rule says for the measured KL
    beta = 0.05
    for m in ms:
        beta = rl.adaptive_kl_beta(beta, m["objective/kl"], 0.5, 10, 3)  # EchoTask has 3 prompts per rollout
    assert s["kl/beta"] == pytest.approx(beta) and beta != 0.05


class ShortTask(Task):
    """Gold prefers answers of at most three words; the proxy below pays for every word: hackable."""

    name = "short"

    def prompts(self, split="train"):
        return [Prompt(f"s{i}", [{"role": "user", "content": f"Say {w}."}]) for i, w in enumerate(["yes", "no", "maybe"])]

    def gold(self, prompt, response, finished=True):
        n = len(response.split())
        return Gold(1.0 if n <= 3 else max(0.0, 1 - (n - 3) / 5))


def word_count(prompt: str, response: str) -> float:
    return len(response.split()) / 8


def short_gold(prompt: str, response: str) -> float:
    return ShortTask().gold(None, response).score


def test_monitor_catches_a_hacked_proxy_and_keeps_the_best_policy(tmp_path, word_policy):
    flags = {"model.name": word_policy, "task.name": "test_ppo:ShortTask", "model.lora_r": 0, "train.max_steps": 20,
             "train.lr": 3e-3, "rollout.prompts_per_step": 3, "rollout.group_size": 4, "rollout.max_new_tokens": 16,
             "ppo.minibatch_size": 6,
             "ppo.kl_coef": 0.001, "ppo.vf_coef": 0.5, "reward.score_truncated": False, "monitor.window": 3,
             "monitor.stop_on_flag": True, "monitor.keep_best": "gold", "train.eval_every": 2, "eval_prompts": 3}
    s = ppo.train(ppo_cfg(tmp_path, "hacked", **flags), reward_fn=word_count)
    out = tmp_path / "hacked"
    rows = [json.loads(x) for x in (out / "monitor.jsonl").read_text().splitlines()]
    assert any(r["flag"] == "gold_falls_while_proxy_rises" for r in rows), rows
    ms = [m for m in metrics(out) if "objective/scores" in m]
    assert ms[-1]["response/length_mean"] > ms[0]["response/length_mean"]
    assert ms[-1]["monitor/flag_gold_falls_while_proxy_rises"] == 1.0 and "monitor/sqrt_kl" in ms[-1]
    # stopped at the flag; the best held-out gold so far was kept beside the final policy
    assert s["monitor"]["stopped_early"] and s["steps"] < 20 and s["steps"] == ms[-1]["step"]
    evals = {m["step"]: m["eval/gold"] for m in metrics(out) if "eval/gold" in m and m["step"] > 0}
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == max(evals.values()) and evals[best["step"]] == best["value"]
    assert (out / "best" / "model" / "model.safetensors").exists() and s["best"]["step"] == best["step"]

    # the same run with the gold itself as the reward: nothing to hack, no flag
    # (truncated responses scored too: with the missing-EOS penalty the proxy would differ from the gold)
    flags |= {"monitor.stop_on_flag": False, "monitor.keep_best": "none", "train.max_steps": 8, "train.eval_every": 0,
              "reward.score_truncated": True}
    s = ppo.train(ppo_cfg(tmp_path, "honest", **flags), reward_fn=short_gold)
    assert "gold_falls_while_proxy_rises" not in s["monitor"]["flags"], s["monitor"]


def test_running_normalisation_standardises_the_first_batch(tmp_path, tiny_rm):
    """reward.normalize=running: the first rollout's RM scores are normalised by their own mean and std."""
    cfg = ppo_cfg(tmp_path, "run", **{"train.max_steps": 1, "model.lora_r": 4, "reward.model": tiny_rm, "reward.normalize": "running",
                                      "ppo.critic_init": "policy", "rollout.prompts_per_step": 3, "rollout.group_size": 2})
    ppo.train(cfg)
    m = [x for x in metrics(tmp_path / "run") if "objective/scores" in x][0]
    assert m["objective/scores"] == pytest.approx(0.0, abs=1e-5)
    assert not any("ensemble" in k or "disagreement" in k for k in m)  # one reward model: absent, not zero


def test_max_grad_norm_zero_means_no_clipping(tmp_path):
    """train.max_grad_norm=0 means "no clipping", as in every other trainer (it once multiplied every gradient by 0)."""
    seen = {}
    cfg = ppo_cfg(tmp_path, **{"model.lora_r": 4, "train.max_steps": 1, "train.max_grad_norm": 0.0})
    ppo.train(cfg, reward_fn=lowercase_share, on_step=lambda it, run, modules: seen.update(modules=modules))
    moved = [n for n, p in seen["modules"]["policy"].named_parameters() if "lora_B" in n and ".default." in n and p.abs().sum() > 0]
    assert moved
    ms = [x for x in metrics(tmp_path / "ppo") if "train/grad_norm" in x]
    assert ms[0]["train/grad_norm"] > 0


def test_weight_decay_spares_norms_and_biases(tmp_path):
    """PPO uses the shared optimizer set-up: with a zero reward (no gradient at all) one step of AdamW only
    decays the matrices, by exactly (1 - lr * weight_decay); norm weights stay as they were."""
    seen = {}
    cfg = ppo_cfg(tmp_path, **{"model.lora_r": 0, "ppo.algo": "reinforce", "train.max_steps": 1, "ppo.epochs": 1, "train.weight_decay": 0.5,
                               "train.lr": 0.1})
    before = {n: p.detach().clone() for n, p in load_causal_lm("builtin:tiny").named_parameters()}
    ppo.train(cfg, reward_fn=lambda prompt, response: 0.0, on_step=lambda it, run, modules: seen.update(modules=modules))
    after = dict(seen["modules"]["policy"].named_parameters())
    assert any(p.ndim == 1 for p in after.values())
    for n, p in after.items():
        want = before[n] * (1 - 0.1 * 0.5) if p.ndim >= 2 else before[n]
        assert torch.allclose(p.detach(), want, rtol=1e-6, atol=0), n


def test_target_kl_stops_the_epochs_early(tmp_path):
    """ppo.target_kl: once an epoch's mean approx KL passes it, the remaining epochs are skipped. One minibatch
    per epoch: epoch 0 runs at ratio 1 (KL 0), epoch 1 after an update, so the stop comes after epoch 1."""
    flags = {"model.lora_r": 4, "train.max_steps": 1, "ppo.epochs": 4, "train.lr": 3e-2}
    ppo.train(ppo_cfg(tmp_path, "stop", **flags, **{"ppo.target_kl": 1e-9}), reward_fn=lowercase_share)
    ppo.train(ppo_cfg(tmp_path, "full", **flags), reward_fn=lowercase_share)
    stop = [m for m in metrics(tmp_path / "stop") if "policy/approxkl" in m][0]
    full = [m for m in metrics(tmp_path / "full") if "policy/approxkl" in m][0]
    assert stop["policy/early_stop_epoch"] == 1.0 and "policy/early_stop_epoch" not in full
    # grad norms are logged once per optimizer step: 2 epochs x 1 minibatch against 4
    assert stop["policy/approxkl"] > 0 and full["policy/approxkl"] > 0


@pytest.mark.parametrize("whiten", [True, False])
def test_whiten_advantages_switch(tmp_path, monkeypatch, whiten):
    calls = []
    real = ppo.rl.masked_whiten
    monkeypatch.setattr(ppo.rl, "masked_whiten", lambda x, mask, **kw: calls.append(x.clone()) or real(x, mask, **kw))
    ppo.train(ppo_cfg(tmp_path, **{"model.lora_r": 4, "train.max_steps": 2, "ppo.whiten_advantages": whiten}),
              reward_fn=lowercase_share)
    assert len(calls) == (2 if whiten else 0)


def test_kl_loss_honours_the_estimator_and_refuses_k1(tmp_path):
    with pytest.raises(TetherError, match="zero expected gradient"):
        ppo.train(ppo_cfg(tmp_path, "k1", **{"ppo.kl_in_reward": False, "ppo.kl_estimator": "k1"}), reward_fn=lowercase_share)
    with pytest.raises(TetherError, match="zero expected gradient"):
        ppo.train(ppo_cfg(tmp_path, "g1", **{"ppo.algo": "grpo", "ppo.kl_estimator": "k1"}), reward_fn=lowercase_share)
    assert not (tmp_path / "k1").exists() and not (tmp_path / "g1").exists()
    # objective/kl is the estimator that is used: compare k2 and k3 against the per-token values recomputed by hand
    from tether.losses import rl

    assert ppo.kl_setup(load_config(PPOConfig, None, {"ppo.algo": "grpo"}).ppo) == (True, "k3")
    assert ppo.kl_setup(load_config(PPOConfig, None, {}).ppo) == (False, "k1")
    assert ppo.kl_setup(load_config(PPOConfig, None, {"ppo.kl_in_reward": False, "ppo.kl_estimator": "k2"}).ppo) == (True, "k2")
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(rl.kl_loss(lp, ref, "k2"), torch.tensor([[0.125, 0.5]]))


def test_dr_grpo_normaliser_divides_by_the_generation_budget(tmp_path, monkeypatch):
    """loss_norm=constant: the policy loss is summed over tokens and divided by sequences x max_new_tokens."""
    seen = []
    real = ppo.rl.aggregate
    monkeypatch.setattr(ppo.rl, "aggregate", lambda x, mask, norm="token", budget=None, total=None: seen.append((norm, budget, total)) or real(x, mask, norm, budget, total))
    ppo.train(ppo_cfg(tmp_path, **{"ppo.algo": "grpo", "ppo.grpo_scale_std": False, "ppo.loss_norm": "constant",
                                   "rollout.group_size": 2, "rollout.prompts_per_step": 3}), reward_fn=lowercase_share)
    assert seen and all(s == ("constant", 12, 6) for s in seen)  # 6 sequences in the (only) minibatch


def test_critic_starts_from_a_reward_model_with_the_same_vocabulary(tmp_path, tiny_rm):
    """ppo.critic_init=reward (Huang et al. 2024): the critic is a copy of the RM, so its first values are the RM's
    per-token scores."""
    from tether.models import load_reward_model, load_tokenizer, token_scores

    cfg = ppo_cfg(tmp_path, **{"model.lora_r": 0, "reward.model": tiny_rm, "ppo.critic_init": "reward"})
    tok = load_tokenizer("builtin:tiny")
    rm, rm_tok = load_reward_model(tiny_rm)
    critic = ppo.make_critic(cfg, load_causal_lm("builtin:tiny"), tok, rm_tok)
    assert isinstance(critic, ppo.SeparateCritic)
    ids = torch.tensor([[1, 504, 2683, 314, 260, 2]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(critic(ids, mask), token_scores(rm.eval(), ids, mask), atol=1e-6)


def test_own_prompts_without_gold(tmp_path, tiny_rm, capsys):
    """`tether ppo --prompts FILE --reward-model RM --algo grpo`: no task, no gold scorer; gold metrics are absent."""
    from conftest import write_jsonl
    from tether.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about {w}."} for w in ("cats", "rain", "tea")]
                          + [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "What is snow?"}, {"prompt": "Name a colour."}])
    out = tmp_path / "out"
    code = main(["ppo", "--prompts", str(prompts), "--eval-prompts", str(held), "--reward-model", tiny_rm, "--algo", "grpo",
                 "--model", "builtin:tiny", "--max-steps", "2", "--out", str(out), "--report-to", "none", "--kl-coef", "0.2",
                 "--dtype", "fp32", "--set", "rollout.max_new_tokens=6", "--set", "rollout.prompts_per_step=2",
                 "--set", "monitor.window=1", "--set", "sample_every=1"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["has_gold"] is False and "eval/gold" not in s and {"eval/score", "eval/score_initial"} <= set(s)
    rows = metrics(out)
    assert not any(k.startswith("eval/gold") or k in ("objective/gold", "monitor/gold_delta", "monitor/flag_gold_falls_while_proxy_rises")
                   for m in rows for k in m)
    it = [m for m in rows if "objective/scores" in m]
    assert len(it) == 2 and it[0]["kl/beta"] == 0.2 and "monitor/proxy_delta" in it[1]
    assert all("gold" not in r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines()))
    cfg = load_config(PPOConfig, out / "config.yaml")
    assert (cfg.ppo.algo, cfg.data.path, cfg.data.eval_path, cfg.reward.model) == ("grpo", str(prompts), str(held), tiny_rm)
    assert "held-out score" in capsys.readouterr().out


@pytest.mark.parametrize("row,message", [
    ({"prompt": "   "}, "row 2, field 'prompt': empty prompt"),
    ({"prompt": 42}, "row 2, field 'prompt': expected a string or a list of messages, got int"),
    (b'{"prompt": "caf\xff"}', "row 2: not valid UTF-8"),
])
def test_bad_prompt_files_exit_2_naming_file_and_row(tmp_path, tiny_rm, capsys, row, message):
    from tether.cli import main

    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n' + (row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n")
    code = main(["ppo", "--prompts", str(path), "--reward-model", tiny_rm, "--algo", "grpo", "--model", "builtin:tiny",
                 "--max-steps", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"tether: error: {path}, {message}") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_one_epoch_one_step_grpo_reuses_the_training_forward_as_old_log_probs(tmp_path, monkeypatch):
    """GRPO with one epoch and one optimizer step per batch: the old log-probs are each minibatch's own
    detached forward (no separate pass); the update, the ratio (exactly 1) and the logged KL are those of
    the same run with the separate pass."""
    import tether.rollout as rollout

    calls = []
    real = rollout.policy_forward
    monkeypatch.setattr(ppo, "policy_forward", lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k))
    flags = {"ppo.algo": "grpo", "ppo.epochs": 1, "rollout.group_size": 2, "ppo.minibatch_size": 6, "ppo.grad_accum": 2,
             "train.max_steps": 1, "model.lora_r": 4}
    seen = {}
    ppo.train(ppo_cfg(tmp_path, "fast", **flags), reward_fn=lowercase_share,
              on_step=lambda it, run, modules: seen.setdefault("fast", {n: p.detach().clone() for n, p in modules.named_parameters()}))
    assert calls.count(False) == 1  # the reference pass only
    calls.clear()
    monkeypatch.setattr(ppo.math, "ceil", lambda x: 10**6)  # the condition fails: the separate pass runs
    ppo.train(ppo_cfg(tmp_path, "slow", **flags), reward_fn=lowercase_share,
              on_step=lambda it, run, modules: seen.setdefault("slow", {n: p.detach().clone() for n, p in modules.named_parameters()}))
    assert calls.count(False) == 2
    a, b = metrics(tmp_path / "fast")[-1], metrics(tmp_path / "slow")[-1]
    assert a["policy/ratio_first_mb"] == 1.0 and b["policy/ratio_first_mb"] == pytest.approx(1.0, abs=1e-6)
    assert a["objective/kl"] == pytest.approx(b["objective/kl"], abs=1e-6)
    assert a["loss/policy"] == pytest.approx(b["loss/policy"], abs=1e-6)
    for n, p in seen["fast"].items():
        assert torch.allclose(p, seen["slow"][n], atol=1e-6), n
