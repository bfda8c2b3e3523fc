"""One config system for every stage: typed dataclasses, filled from a YAML recipe, then `--set` overrides.

Precedence (lowest to highest): dataclass defaults < YAML file < plain CLI flags < `--set key=value`.
Every key is checked: an unknown key is an error naming the nearest valid one, a value of the wrong
type or outside its choices is an error naming the key. The resolved config is written to the run
folder as `config.yaml`, and loading that file reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tether.errors import TetherError


def _choice(default, choices, help=""):
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


@dataclass
class ModelConfig:
    name: str = "builtin:smollm2-135m-instruct"  # builtin:*, a local folder, or a Hugging Face id
    dtype: str = _choice("auto", ("auto", "fp32", "bf16"), "auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 32  # LoRA scaling: the update is (alpha / r) * B @ A
    lora_dropout: float = 0.0  # dropout on the LoRA input (PPO forces 0, so the first ratio is 1)
    lora_target: str = "all-linear"  # comma-separated module names, or all-linear
    merge: bool = True  # with LoRA: write merged weights to OUT/model (the adapter goes to OUT/adapter)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    trust_remote_code: bool = False  # run Python code shipped with a model folder; off unless you trust its source
@dataclass
class DataConfig:
    path: str = "builtin:demos"  # JSONL/JSON/Parquet/CSV file, a `datasets` folder, or builtin:demos
    eval_path: str | None = None  # held-out file; without it `eval_fraction` of `path` is held out
    eval_fraction: float = 0.1  # share of whole prompts (or rows) held out when there is no eval_path
    max_length: int = 512  # max tokens per example (prompt + completion)
    overlong: str = _choice("truncate", ("truncate", "drop", "error"), "policy for rows over max_length")
    packing: bool = False  # pack several examples per row (block-diagonal attention, no leakage)
    # preference data: train only on pairs whose annotators agree at least this much,
    # max(p_chosen, 1 - p_chosen) >= min_agreement (needs a p_chosen column; 0 = keep every pair)
    min_agreement: float = 0.0


@dataclass
class TrainConfig:
    out: str = "runs/sft"  # the run folder
    seed: int = 0  # seeds Python, torch and numpy; the data order derives from it
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs
    epochs: float = 1.0  # passes over the data when max_steps is 0
    lr: float = 2e-5  # peak learning rate
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    group_by_length: bool = True  # micro-batches of similar lengths (less padding), in shuffled order
    schedule: str = _choice("cosine", ("cosine", "linear", "constant"))
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    weight_decay: float = 0.0  # AdamW decay, on matrices only (never norms or biases)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    log_every: int = 1  # write metrics every N optimizer steps
    eval_every: int = 0  # 0 = evaluate only before and after training
    eval_batches: int = 0  # 0 = the whole held-out split
    save_every: int = 50  # checkpoint every N steps (and always on SIGTERM/SIGINT and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in OUT/checkpoints
    max_nan_skips: int = 5  # consecutive non-finite steps skipped before the run stops
    resume: bool = False  # continue from the newest checkpoint in out
    overwrite: bool = False  # replace a finished run in `out` (a tether run folder only): emptied first, no stale files
    report_to: str = _choice("tensorboard", ("none", "tensorboard", "wandb", "mlflow"))
    verbose: bool = False  # show a rendered example and more logs
@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TaskConfig:
    name: str = "builtin:instruct"  # builtin:instruct, a registered task, or package.module:Class
    num_prompts: int = 0  # train prompts to use (0 = all)
    num_eval_prompts: int = 0  # held-out prompts to use (0 = all)


@dataclass
class SampleConfig:
    k: int = 4  # responses per prompt
    temperature: float = 0.7  # sampling temperature (0 = greedy)
    top_p: float = 0.9  # nucleus sampling; 1 = off
    max_new_tokens: int = 96  # response budget; a response without EOS by then is truncated
    batch_size: int = 16  # sequences per generate() call


@dataclass
class PanelConfig:
    """Simulated annotators (tether.tasks.annotators): see the formula there."""

    size: int = 5  # annotators in the panel
    per_pair: int = 3  # annotators voting on each pair; the label is their majority
    temperature: float = 0.15  # T: how sharply an annotator follows the gold difference
    length_bias: float = 0.0  # mean logit bonus per 100 characters of extra length
    length_bias_spread: float = 0.1  # per-annotator spread of the length bias
    position_bias: float = 0.3  # logit bonus for the response shown first
    flip_rate: float = 0.05  # probability an annotator's vote is flipped at random
@dataclass
class PromptDataConfig:
    """Your own prompts for RL, instead of a task's: prompt-only rows (`prompt` as a string or a message list)."""

    path: str = ""  # JSONL/JSON/Parquet/CSV file or `datasets` folder of prompts; "" = the task's prompts
    eval_path: str = ""  # held-out prompts (scored greedily before and after training); "" = none with your own prompts


@dataclass
class FeedbackConfig:
    """Who answers CAI's critique, revision and comparison questions: a local model, or an OpenAI-compatible server."""
    model: str = "builtin:smollm2-135m-instruct"  # a local causal LM (builtin:*, folder, hub id); with url: the server's model name
    url: str = ""  # an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1 from `tether serve`); "" = the local model
    api_key_env: str = ""  # name of the environment variable holding the API key (never logged or written); "" = no key
    concurrency: int = 8  # url: requests in flight at once
    timeout: float = 60.0  # url: seconds per request before it counts as failed (after retries)
    max_retries: int = 3  # url: retries with exponential back-off on 408/409/429/5xx and lost connections
    cache: str = ""  # the answers' disk cache (JSONL); "" = OUT/feedback-cache.jsonl, so a rerun sends nothing twice
    batch_size: int = 32  # local: sequences per engine call
    dtype: str = _choice("auto", ("auto", "fp32", "bf16"))
    trust_remote_code: bool = False


@dataclass
class AILabellerConfig:
    """The AI labeller's questions (tether.labeller; RL-CAI, Bai et al. 2022)."""
    swap: bool = True  # ask with both orders (A/B swapped) and average, cancelling position bias
    cot: bool = False  # chain of thought first, then the choice; the probability clamped to [cot_low, cot_high]
    cot_low: float = 0.4
    cot_high: float = 0.6
    cot_max_new_tokens: int = 96  # budget of the chain of thought
    answer_prefix: str = "The better response is ("  # the start of the labeller's answer, continued by the option letter


@dataclass
class LabelConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)  # your own prompts (path; eval_path held out) instead of the task's
    sample: SampleConfig = field(default_factory=SampleConfig)
    labeller: str = _choice("panel", ("panel", "ai"),
                            "panel: the simulated annotators (they read the task's gold scores); ai: the AI labeller of RL-CAI "
                            "(feedback, constitution, ai), which needs no gold and so labels your own prompts' samples too")
    panel: PanelConfig = field(default_factory=PanelConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)  # labeller=ai: the feedback model
    constitution: str = "builtin:default"  # labeller=ai: the constitution whose `compare` questions are asked
    ai: AILabellerConfig = field(default_factory=AILabellerConfig)  # labeller=ai: how the questions are asked
    out: str = "runs/label"  # the output folder
    overwrite: bool = False  # replace a finished label run (or one of another config) in `out`; else it continues
    seed: int = 0  # seeds prompt sampling and the panel's votes
@dataclass
class RMLossConfig:
    soft_labels: bool = False  # train on p_chosen (the annotators' vote share) when the data has it
    label_smoothing: float = 0.0  # eps: the target becomes (1 - eps) for chosen
    use_margin: bool = True  # subtract a 'margin' column when the data has one
    center_coef: float = 0.01  # coef * mean((r_c + r_r)^2); 0 turns it off


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(path="", max_length=512))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/rm", lr=1e-5, batch_size=4))
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    # reward models in an ensemble (Coste et al. 2023): member m trains like a single reward model with seed
    # train.seed + m; OUT/model then holds ensemble.json and member-0, member-1, ... (1 = one reward model)
    ensemble: int = 1
    ensemble_bootstrap: bool = True  # ensemble > 1: each member trains on its own bootstrap resample of the train prompts


@dataclass
class EvalRMConfig:
    model: str = ""  # a reward model folder (tether rm's OUT/model, or any sequence classifier), or an ensemble folder
    data: str = ""  # held-out preference pairs (e.g. tether label's OUT/eval.jsonl)
    out: str = "runs/eval-rm"  # the output folder
    overwrite: bool = False  # replace a finished run in `out` (emptied first)
    batch_size: int = 16  # conversations per forward
    max_length: int = 512  # max tokens per scored conversation (the start is cut)
    bins: int = 10  # calibration bins for the expected calibration error
    dtype: str = _choice("auto", ("auto", "fp32", "bf16"))


@dataclass
class RewardConfig:
    """What the policy is rewarded by: a reward model, the task's gold scorer, or a weighted sum."""

    model: str = ""  # reward model folder (tether rm's OUT/model or any sequence classifier), or an ensemble folder; "" = none
    url: str = ""  # or a reward model served over HTTP: `tether serve RM_FOLDER`'s base URL (.../v1), POST /rewards
    api_key_env: str = ""  # url: name of the environment variable holding the server's API key
    model_weight: float = 1.0  # weight of the reward model's (normalised) score
    ensemble: str = _choice("mean", ("mean", "uwo", "wco"),
                            "an ensemble's members (each normalised by its own statistics) combined: mean; uwo = mean - "
                            "uwo_lambda * std over members; wco = min over members (Coste et al. 2023; "
                            "tether.losses.rl.ensemble_reward). On a single reward model all three are its score")
    uwo_lambda: float = 1.0  # reward.ensemble=uwo: weight of the members' std (in normalised reward units)
    gold_weight: float = 0.0  # weight of the task's gold score (for experiments: the gold is then no longer held out)
    function: str = ""  # package.module:func, func(prompt: str, response: str) -> float, added to the score
    normalize: str = _choice("stored", ("stored", "running", "none"), "stored: the RM's tether_reward_mean/std")
    clip: float = 0.0  # clip the (normalised) score to [-clip, clip]; 0 = off
    missing_eos_penalty: float = -1.0  # score of a truncated response (no EOS) ...
    score_truncated: bool = False  # ... unless truncated responses are scored like the others
    # length-debiased reward model: r - length_slope * (characters - length_center), before normalising;
    # eval-rm measures both on held-out responses (summary keys length_slope, length_mean)
    length_slope: float = 0.0
    length_center: float = 0.0  # characters; see length_slope
@dataclass
class RolloutConfig:
    prompts_per_step: int = 8  # distinct prompts per iteration (each sampled group_size times)
    group_size: int = 0  # samples per prompt; 0 = 1 for ppo and reinforce, 4 for grpo and rloo (they need >= 2)
    temperature: float = 1.0  # the policy's log-probs use the same temperature, so PPO stays on-policy
    max_new_tokens: int = 64  # response budget; a response without EOS by then is truncated
    batch_size: int = 16  # sequences per generate() call
    engine: str = _choice("hf", ("hf", "vllm"))  # the rollout engine: tether's own (CPU or GPU), or vLLM (tether[vllm], CUDA)
    tis_cap: float = 2.0  # vllm: truncated importance sampling, w = min(pi_trainer / pi_vllm, cap) per token; 0 = off
    vllm_gpu_memory: float = 0.3  # vllm: the share of the GPU its weights and KV cache may take (the trainer needs the rest)
    vllm_sleep: bool = True  # vllm: free its KV cache and offload its weights while the trainer runs


@dataclass
class PPOHyper:
    algo: str = _choice("ppo", ("ppo", "grpo", "rloo", "reinforce"))
    epochs: int = 2  # optimisation epochs over each rollout batch
    minibatch_size: int = 4  # sequences per forward/backward
    grad_accum: int = 1  # minibatches per optimizer step
    clip: float = 0.2  # epsilon of the clipped surrogate: ratios outside [1 - clip, 1 + clip] get no gradient
    dual_clip: float = 0.0  # 0 = off; e.g. 3.0
    vf_clip: float = 0.2  # value updates are clipped to old value +- vf_clip
    vf_coef: float = 0.1  # weight of the value loss
    ent_coef: float = 0.0  # entropy bonus (0 = off; RLHF rarely needs one)
    gamma: float = 1.0  # discount (1 = none: the score arrives at the end)
    lam: float = 0.95  # GAE lambda: bias-variance trade-off of the advantages
    whiten_advantages: bool = True  # normalise advantages over the batch (mean 0, std 1)
    kl_estimator: str = _choice("auto", ("auto", "k1", "k2", "k3"),
                                "auto: k1 in the reward (its value is unbiased), k3 as a loss (GRPO's); as a loss, k2's "
                                "gradient is that of KL(pi||ref), k3's that of KL(ref||pi), and k1's is zero in expectation "
                                "(refused); see tether.losses.rl.kl_loss")
    kl_in_reward: bool = True  # per-token KL penalty in the reward; False = KL as a loss term (GRPO always uses the loss)
    kl_coef: float = 0.05  # beta
    adaptive_kl: bool = False  # Ziegler et al.'s controller towards kl_target
    kl_target: float = 6.0  # adaptive_kl: the KL per response (nats) the controller steers to
    kl_horizon: int = 10000  # adaptive_kl: samples over which beta moves by at most 20%
    target_kl: float = 0.0  # stop the epoch early when approx KL passes this; 0 = off
    critic_warmup_steps: int = 0  # iterations that train only the critic
    grpo_scale_std: bool = True  # False: no division by the group's std (Dr. GRPO: with loss_norm=constant)
    loss_norm: str = _choice("token", ("token", "constant"),
                             "how per-token losses are summed into a minibatch loss: token = mean over the minibatch's "
                             "real tokens; constant = sum / (sequences * rollout.max_new_tokens), Dr. GRPO's "
                             "(Liu et al. 2025) length-unbiased normaliser")
    critic_init: str = _choice("reward", ("reward", "policy"), "critic from the reward model (Huang et al. 2024) or the policy")
    critic_backbone: str = _choice("auto", ("auto", "shared", "separate", "head"),
                                   "shared: the critic is its own LoRA adapter on the policy's base (no second model); "
                                   "head: a value head on the policy's last hidden state (one forward for both, half "
                                   "the training compute; the value loss also moves the policy); "
                                   "auto: shared with LoRA unless the critic starts from a reward model's weights")
    ptx_coef: float = 0.0  # PPO-ptx: LM loss on ptx_data mixed in (InstructGPT)
    ptx_data: str = "builtin:demos"  # demonstrations for ptx_coef (any SFT data)
    max_nan_skips: int = 5  # consecutive non-finite minibatches skipped before the run stops
@dataclass
class MonitorConfig:
    """Over-optimisation monitor (Gao, Schulman, Hilton 2022): proxy and gold side by side against sqrt(KL)."""
    window: int = 5  # iterations compared: the last `window` against the `window` before them
    gold_drop: float = 0.02  # flag 'gold falls while proxy rises' when gold drops by more than this ...
    proxy_rise: float = 0.02  # ... while the proxy score rises by more than this
    length_corr: float = 0.5  # flag when |corr(score, response length)| over the window passes this
    repetition: float = 0.2  # flag when the mean repeated-trigram share of responses passes this
    # reward-model ensemble: flag when the members' mean disagreement (std across members) over the last `window`
    # iterations exceeds that of the first `window` by more than this factor (0.5 = +50%)
    disagreement_rise: float = 0.5
    # stop the run at the first over-optimisation flag (gold falls while proxy rises, or ensemble disagreement);
    # the best checkpoint is kept
    stop_on_flag: bool = False
    keep_best: str = _choice("none", ("none", "gold", "proxy"),
                             "keep OUT/best: the policy with the best held-out gold (eval.gold at eval_every), or best proxy within kl_budget")
    kl_budget: float = 0.0  # keep_best=proxy: only iterations with KL below this count; 0 = no limit


# --------------------------------------------------------------------------------------------------
# Loading, overriding, validating


@dataclass
class PPOConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora_r=16, lora_alpha=32))
    task: TaskConfig = field(default_factory=TaskConfig)  # prompts and gold scorer, unless data.path names your own prompts
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOHyper = field(default_factory=PPOHyper)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/ppo", lr=1e-4, max_steps=30, save_every=10))
    sample_every: int = 5  # write a sample table to OUT/samples.jsonl every N iterations
    eval_prompts: int = 32  # held-out prompts answered greedily before and after training (gold, or the reward without one); 0 = off
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass
class EvalSampleConfig:
    temperature: float = 0.0  # 0 = greedy: the scores in the table come from deterministic responses
    top_p: float = 1.0  # nucleus sampling when temperature > 0; 1 = off
    max_new_tokens: int = 64  # response budget per prompt
    batch_size: int = 16  # prompts per generate() call
@dataclass
class EvalConfig:
    """`tether eval`: models on held-out prompts of a task, side by side."""
    models: dict[str, str] = field(default_factory=dict)  # label -> model (builtin:*, folder); evaluated in order
    reference: str = ""  # label in `models` (or a model) for KL(model || reference); "" = the first model
    baseline: str = ""  # label the others' win rates are measured against; "" = the reference
    reward_model: str = ""  # reward model folder for rm scores and best-of-n; "" = none
    task: TaskConfig = field(default_factory=lambda: TaskConfig(num_eval_prompts=64))
    sample: EvalSampleConfig = field(default_factory=EvalSampleConfig)
    kl_samples: int = 1  # responses per prompt sampled at temperature 1 for the KL estimate (and sampled gold); 0 = off
    best_of_n: int = 0  # best-of-n against the reward model from the reference, n = 1, 2, 4, ... up to this; 0 = off
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # thresholds of the flags in results.json
    out: str = "runs/eval"  # the output folder
    overwrite: bool = False  # replace a finished run in `out` (emptied first)
    seed: int = 0  # seeds the temperature-1 samples (KL, best-of-n)
    dtype: str = _choice("auto", ("auto", "fp32", "bf16"))


@dataclass
class DirectHyper:
    """Direct preference methods (tether dpo / kto / orpo); the formulas are in tether.losses.preference."""
    method: str = _choice("dpo", ("dpo", "kto", "orpo"), "set by the command (tether dpo|kto|orpo) or the recipe's kind")
    loss_type: str = _choice("sigmoid", ("sigmoid", "ipo", "ipo_avg", "hinge", "robust", "cdpo", "simpo"),
                             "tether dpo only; simpo is reference-free")
    beta: float | None = None  # None = the paper's default: 0.1 (DPO family, IPO, KTO), 2.0 (SimPO); unused by ORPO
    label_smoothing: float = 0.0  # eps, the assumed label-flip rate: cdpo and robust need it > 0; also sigmoid, simpo
    gamma: float = 0.5  # SimPO's target margin, in reward units (beta * per-token log-prob), not divided by beta
    lam: float = 0.1  # ORPO: weight of the odds-ratio term next to the SFT loss on chosen
    desirable_weight: float = 1.0  # KTO: keep w_D * n_desirable / (w_U * n_undesirable) in [1, 4/3] (the paper)
    undesirable_weight: float = 1.0  # KTO: weight of undesirable examples (see desirable_weight)
    precompute_ref: bool = True  # reference log-probs once before training, cached in OUT/ref_logps.safetensors
    ref_model: str = ""  # "" = model.name (with LoRA: the same model with its adapter disabled)
    soft_labels: bool = False  # sigmoid/cdpo: train on p_chosen (the annotators' vote share) when the data has it


@dataclass
class DirectConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(path="", max_length=512))
    # full fine-tuning wants a small lr (DPO paper: 5e-7 at batch 64; 1e-6..5e-6 for a 135M model);
    # with LoRA raise it to ~5e-5..1e-4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/dpo", lr=1e-6, batch_size=4, grad_accum=2,
                                                                   warmup_steps=2))
    direct: DirectHyper = field(default_factory=DirectHyper)


@dataclass
class CAIGenConfig:
    temperature: float = 0.7  # sampling temperature of responses, critiques and revisions
    top_p: float = 0.9
    max_new_tokens: int = 96  # budget of each response and revision; a revision cut at it is dropped (truncated)
    critique_max_new_tokens: int = 96  # budget of each critique


@dataclass
class CAIReviseConfig:
    """`tether cai revise` (SL-CAI, Bai et al. 2022): response, then `rounds` x (principle, critique, revision)."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    constitution: str = "builtin:default"  # builtin:default or a constitution YAML file (see tether.constitution)
    task: TaskConfig = field(default_factory=TaskConfig)  # prompts (the train split), unless data.path names your own
    categories: str = ""  # builtin:instruct only: comma-separated prompt categories (e.g. harmful,lookalike); "" = all
    data: PromptDataConfig = field(default_factory=PromptDataConfig)  # data.path: your own prompts (prompt-only rows)
    rounds: int = 2  # critique-revision rounds per prompt
    few_shot: bool = True  # show the constitution's examples before each critique and revision
    # SFT data written into OUT/sft.jsonl beside the revisions (e.g. builtin:demos): SL-CAI fine-tunes on revisions AND on
    # helpful answers, or the model learns only refusals (Bai et al. 2022 mix in the helpful model's answers); "" = revisions only
    helpful_data: str = ""
    sample: CAIGenConfig = field(default_factory=CAIGenConfig)
    out: str = "runs/cai-revise"  # the output folder
    overwrite: bool = False  # replace a finished run in `out`; else an unfinished one continues (its answers are cached)
    seed: int = 0  # seeds the principle sampler and the sampling


@dataclass
class CAILabelConfig:
    """`tether cai label` (RL-CAI, Bai et al. 2022): an AI labeller picks the better response of each pair."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    constitution: str = "builtin:default"  # builtin:default or a constitution YAML file; principles need `compare`
    ai: AILabellerConfig = field(default_factory=AILabellerConfig)
    data: str = ""  # pairs to label: prompt + chosen/rejected (e.g. tether label's train.jsonl) or response_a/response_b
    eval_data: str = ""  # held-out pairs, labelled the same way (e.g. tether label's eval.jsonl); "" = none
    max_pairs: int = 0  # label at most this many pairs of each file (seeded draw); 0 = all
    out: str = "runs/cai-label"  # the output folder
    overwrite: bool = False  # replace a finished run in `out`; else an unfinished one continues (its answers are cached)
    seed: int = 0  # seeds the principle sampler and the pair order


@dataclass
class AnnotateExportConfig:
    """`tether annotate export` as a pipeline stage: the people's answers so far, as preference data."""
    db: str = ""  # the annotation database (a SQLite file or a SQLAlchemy URL)
    keep_ties: bool = False  # count a tie vote half to each side, and keep pairs at 0.5
    kto: bool = False  # KTO's unpaired rows (prompt, completion, label) instead of pairs
    min_pairs: int = 1  # fail when fewer pairs than this have a preference (the people are not done yet)
    out: str = "runs/annotate-export"  # the output folder: OUT/train.jsonl


def config_keys(cls) -> list[str]:
    """All dotted keys of a config class, e.g. ['model.name', 'model.dtype', ...]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{f.name}.{k}" for k in config_keys(hints[f.name])]
        else:
            keys.append(f.name)
    return keys


def _mapping_keys(cls, prefix: str = "") -> list[str]:
    """Dotted keys of dict-typed fields (e.g. eval's `models`), whose entries `--set models.sft=...` may add."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _mapping_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is dict:
            out.append(prefix + f.name)
    return out


def _unknown_key(key: str, valid: list[str], where: str) -> TetherError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not near:  # a bare leaf name ('lr') should still find 'train.lr'
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)
        near = [leaves[hit[0]]] if hit else []
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return TetherError(f"unknown config key '{key}'{where}{hint}")


_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str, choices: tuple = ()) -> Any:
    """Check (and gently convert) a value against a field's type; int -> float is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if value is None and tp is str and "none" in choices:
        value = "none"  # `--set train.report_to=none`: YAML reads a bare none as null, the choice is named "none"
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 (PyYAML) reads 1e-4 and 3e-5, with no dot, as strings
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise TetherError(f"config key '{key}' expects a mapping, got {value!r}")
        vt = typing.get_args(tp)[1]
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool))
    )
    if not ok:
        raise TetherError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
    value = tp(value)
    if choices and value not in choices:
        raise TetherError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
    return value


def _build(cls, data: dict, prefix: str, where: str):
    if not isinstance(data, dict):
        raise TetherError(f"config section '{prefix.rstrip('.') or '<root>'}'{where} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = [prefix + k for k in config_keys(cls)]
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(prefix + str(name), valid, where)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.", where)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, fields[name].metadata.get("choices", ()))
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise TetherError(f"cannot set '{key}': '{p}' is not a section")
        tree = node
    tree[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=0.001' -> ('train.lr', 0.001). Values are parsed as YAML scalars ('1e-4', which YAML 1.1
    reads as a string, becomes a float when the key's field is one: see _coerce)."""
    if "=" not in text:
        raise TetherError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip().lower() in ("null", "none", "~"):
        value = None
    return key.strip(), value


def read_yaml(path: Path, what: str) -> dict:
    """A YAML file as a dict, with one-line errors for a missing file or invalid YAML."""
    if not path.is_file():
        raise TetherError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TetherError(f"{path}: invalid YAML: {e}") from None


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None, sets: list[str] = ()):
    """Build a `cls` config from defaults, an optional YAML file, flag overrides and `--set` strings."""
    tree: dict = {}
    where = ""
    if path is not None:
        p = Path(path)
        tree = read_yaml(p, "config file")
        where = f" in {p}"
        _build(cls, tree, "", where)  # report file errors against the file, before overrides mix in
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    for s in sets:
        key, value = parse_override(s)
        if key not in config_keys(cls) and not any(key.startswith(k + ".") for k in _mapping_keys(cls)):
            raise _unknown_key(key, config_keys(cls), " (from --set)")
        _set_dotted(tree, key, value)
    return _build(cls, tree, "", "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------------
# Self-documenting output: `tether <stage> --print-config`


def _field_comments(cls) -> dict[str, str]:
    """Each field's comment as written in this file: the comment at the end of its line, else the
    comment lines right above it. (A `_choice` field's `help` takes precedence, in `describe`.)"""
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for n, line in enumerate(lines, start=1):
        head = line[4:].split(":", 1)[0] if line.startswith("    ") and not line.startswith("     ") else ""
        if head not in names or head in out:
            continue
        if n in comments:  # a comment on the field's own line
            out[head] = comments[n]
            continue
        above, k = [], n - 1
        while k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        if above:
            out[head] = " ".join(above)
    return out


def _scalar(value) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def describe(cfg) -> str:
    """The resolved config as YAML, each key with its comment (its choices first), each section with its
    docstring: every key is discoverable from the command line, and the output loads back with --config."""
    lines: list[str] = []

    def walk(obj, indent: str):
        comments = _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            note = f.metadata.get("help") or comments.get(f.name, "")
            if f.metadata.get("choices"):
                note = f"[{' | '.join(f.metadata['choices'])}] {note}".strip()
            if dataclasses.is_dataclass(value):
                doc = (type(value).__doc__ or "").strip()
                doc = "" if doc.startswith(type(value).__name__ + "(") else doc.split("\n")[0]
                note = note or doc
                lines.append(f"{indent}{f.name}:" + (f"  # {note}" if note else ""))
                walk(value, indent + "  ")
            else:
                lines.append(f"{indent}{f.name}: {_scalar(value)}" + (f"  # {note}" if note else ""))

    walk(cfg, "")
    return "\n".join(lines) + "\n"
