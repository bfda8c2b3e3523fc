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
    """policy_forward runs the LM head on response positions only; its log-probs equal the full-logits
    computation and its values equal the value head applied to the last hidden state there."""
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
    assert torch.allclose(logp, want, atol=1e-5)
    assert torch.allclose(values, head(hidden)[..., 0], atol=1e-6)
    assert ent.shape == logp.shape and (ent > 0).all()


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


@pytest.mark.parametrize("algo,group", [("ppo", 1), ("grpo", 4), ("rloo", 4)])
def test_algorithms_raise_a_simple_reward(tmp_path, word_policy, algo, group):
    cfg = ppo_cfg(tmp_path, algo, **{"model.name": word_policy, "ppo.algo": algo, "rollout.group_size": group,
                                     "rollout.prompts_per_step": 16 // group, "train.max_steps": 10, "ppo.minibatch_size": 8,
                                     "ppo.kl_coef": 0.01, "ppo.vf_coef": 0.5, "model.lora_r": 0, "rollout.max_new_tokens": 16,
                                     "reward.score_truncated": False})
    ppo.train(cfg, reward_fn=apple_share)
    scores = [m["objective/scores"] for m in metrics(tmp_path / algo) if "objective/scores" in m]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.15, scores


# full fine-tuning (separate critic), LoRA (shared-base critic), LoRA with a value head on the policy
@pytest.mark.parametrize("lora_r,backbone", [(0, "auto"), (4, "auto"), (4, "head")])
def test_interrupt_and_resume_equals_straight_run(tmp_path, lora_r, backbone):
    from safetensors.torch import load_file

    flags = {"train.max_steps": 3, "model.lora_r": lora_r, "ppo.grad_accum": 2, "ppo.minibatch_size": 3,
             "ppo.critic_backbone": backbone}
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


def test_options_adaptive_kl_ptx_running_norm_kl_loss(tmp_path):
    """The less common switches run and do what they say on a short tiny run."""
    from tether.losses import rl

    cfg = ppo_cfg(tmp_path, "opts", **{"train.max_steps": 2, "model.lora_r": 4, "ppo.adaptive_kl": True, "ppo.kl_target": 0.5,
                                        "ppo.kl_horizon": 10, "ppo.ptx_coef": 0.5, "ppo.kl_in_reward": False,
                                        "ppo.critic_warmup_steps": 1, "reward.clip": 0.3, "ppo.kl_estimator": "k3"})
    s = ppo.train(cfg, reward_fn=lowercase_share)
    ms = [m for m in metrics(tmp_path / "opts") if "objective/scores" in m]
    assert all("loss/ptx" in m for m in ms[1:]) and "loss/ptx" not in ms[0]   # warm-up iteration trains the critic only
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
    flags = {"model.name": word_policy, "task.name": "test_ppo:ShortTask", "model.lora_r": 0, "train.max_steps": 14,
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
    assert s["monitor"]["stopped_early"] and s["steps"] < 14 and s["steps"] == ms[-1]["step"]
    evals = {m["step"]: m["eval/gold"] for m in metrics(out) if "eval/gold" in m and m["step"] > 0}
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == max(evals.values()) and evals[best["step"]] == best["value"]
    assert (out / "best" / "model" / "model.safetensors").exists() and s["best"]["step"] == best["step"]

    # the same run with the gold itself as the reward: nothing to hack, no flag
    flags |= {"monitor.stop_on_flag": False, "monitor.keep_best": "none", "train.max_steps": 8, "train.eval_every": 0}
    s = ppo.train(ppo_cfg(tmp_path, "honest", **flags), reward_fn=short_gold)
    assert "gold_falls_while_proxy_rises" not in s["monitor"]["flags"], s["monitor"]
