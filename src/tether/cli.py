"""The `tether` command: parse flags, build a config, call one stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from tether.errors import TetherError, TrainingDiverged

# plain flags for the common keys -> the dotted config key they set (the first one a stage has)
COMMON_FLAGS = {
    "model": (("model.name", "model"), str, "model: builtin:smollm2-135m-instruct, builtin:tiny, a folder or a hub id"),
    "data": (("data.path", "data"), str, "data file (JSONL/JSON/Parquet/CSV/datasets folder) or builtin:demos"),
    "eval_data": (("data.eval_path",), str, "held-out data (default: data.eval_fraction of --data)"),
    "out": (("train.out", "out"), str, "output folder"),
    "seed": (("train.seed", "seed"), int, None),
    "max_steps": (("train.max_steps",), int, "optimizer steps (default: from train.epochs)"),
    "epochs": (("train.epochs",), float, None),
    "lr": (("train.lr",), float, "learning rate"),
    "batch_size": (("train.batch_size", "batch_size"), int, "examples (rm: prompts) per micro-batch"),
    "grad_accum": (("train.grad_accum",), int, "micro-batches per optimizer step"),
    "max_length": (("data.max_length", "max_length"), int, "max tokens per example"),
    "lora_r": (("model.lora_r",), int, "LoRA rank (0 = full fine-tuning)"),
    "dtype": (("model.dtype", "dtype"), str, "auto | fp32 | bf16"),
    "report_to": (("train.report_to",), str, "none | tensorboard | wandb | mlflow"),
    "task": (("task.name",), str, "task: builtin:instruct or package.module:Class"),
}
SWITCHES = {  # store_true flags -> config key
    "resume": ("train.resume", "continue from the newest checkpoint in --out"),
    "overwrite": ("train.overwrite", "replace a finished run in --out (a tether run folder: emptied first)"),
    "packing": ("data.packing", "pack several examples per row"),
    "verbose": ("train.verbose", "show a rendered example and more logs"),
}


def _stage_parser(sub, name: str, cls, help_: str) -> argparse.ArgumentParser:
    from tether.config import config_keys

    keys = set(config_keys(cls))
    p = sub.add_parser(name, help=help_)
    p.set_defaults(config_cls=cls, flag_keys={})
    p.add_argument("--config", help="YAML recipe (sections as in the resolved OUT/config.yaml)")
    for flag, (candidates, tp, h) in COMMON_FLAGS.items():
        key = next((k for k in candidates if k in keys), None)
        if key:
            p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=tp, help=h)
            p.get_default("flag_keys")[flag] = key
    for flag, (key, h) in SWITCHES.items():
        if key in keys:
            p.add_argument("--" + flag, action="store_true", default=None, help=h)
            p.get_default("flag_keys")[flag] = key
    if "model.merge" in keys:
        p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                       help="with LoRA, write merged weights to OUT/model (default on)")
        p.get_default("flag_keys")["merge"] = "model.merge"
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.warmup_steps=10 (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved config as YAML, every key with its comment, and exit")
    return p


ALGOS = ("ppo: clipped PPO with a critic and GAE; grpo: group-normalised advantages, KL as a loss (Shao et al. 2024); "
         "rloo: leave-one-out baseline (Ahmadian et al. 2024); reinforce: batch-mean baseline")


def _ppo_flags(p: argparse.ArgumentParser) -> None:
    """The flags an RL user looks for first; each sets one config key (all keys: --print-config)."""
    from tether.config import PPOHyper

    algos = dataclasses.fields(PPOHyper)[0].metadata["choices"]
    flags = {
        "algo": ("ppo.algo", str, f"RL algorithm ({ALGOS}); default ppo", algos),
        "reward_model": ("reward.model", str, "reward model folder (tether rm's OUT/model, or any sequence classifier; or an ensemble folder)", None),
        "reward_fn": ("reward.function", str, "Python reward package.module:function(prompt, response) -> float (runs that code)", None),
        "kl_coef": ("ppo.kl_coef", float, "beta, the KL penalty's coefficient", None),
        "reward_ensemble": ("reward.ensemble", str, "a reward-model ensemble's members combined: mean, uwo (mean - "
                            "reward.uwo_lambda * std) or wco (min) (Coste et al. 2023); default mean", ("mean", "uwo", "wco")),
    }
    for flag, (key, tp, h, choices) in flags.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=tp, choices=choices, help=h)
        p.get_default("flag_keys")[flag] = key
    # your own prompts: --prompts is --data, --eval-prompts is --eval-data
    p.add_argument("--prompts", dest="data", metavar="FILE", help="your own prompts (prompt-only rows: `prompt` as a string or messages; "
                   "JSONL/JSON/Parquet/CSV/datasets folder) instead of the task's; no gold scorer then")
    p.add_argument("--eval-prompts", dest="eval_data", metavar="FILE", help="held-out prompts, answered greedily before and after training")


def _flags(p: argparse.ArgumentParser, flags: dict) -> None:
    """Plain flags, each setting one config key: {flag: (key, type, help)}."""
    for flag, (key, tp, h) in flags.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=tp, help=h)
        p.get_default("flag_keys")[flag] = key


def build_parser() -> argparse.ArgumentParser:
    from tether.config import (CAILabelConfig, CAIReviseConfig, DirectConfig, EvalConfig, EvalRMConfig, LabelConfig, PPOConfig,
                               RMConfig, SFTConfig)

    parser = argparse.ArgumentParser(prog="tether", description="RLHF on one machine: SFT, reward models, PPO, DPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    _stage_parser(sub, "sft", SFTConfig, "supervised fine-tuning on demonstrations (loss on assistant tokens)")
    _stage_parser(sub, "label", LabelConfig, "sample K responses per prompt, gold-score them, simulated annotators label pairs")
    rm = _stage_parser(sub, "rm", RMConfig, "train a Bradley-Terry reward model on preference pairs (or an ensemble: --ensemble K)")
    rm.add_argument("--ensemble", type=int, metavar="K", default=None,
                    help="train K reward models, seeds seed..seed+K-1, each on a bootstrap resample of the prompts "
                         "(Coste et al. 2023); OUT/model is then the ensemble folder (default 1)")
    rm.get_default("flag_keys")["ensemble"] = "ensemble"
    _stage_parser(sub, "eval-rm", EvalRMConfig, "reward model accuracy (labels, gold), Bayes ceiling, calibration, length bias")
    _ppo_flags(_stage_parser(sub, "ppo", PPOConfig, "RL against a reward model or function: PPO, GRPO, RLOO, REINFORCE (--algo)"))
    _stage_parser(sub, "eval", EvalConfig, "models side by side on held-out prompts: gold, checks, RM score, KL, length, win rate")
    # the direct methods share one config (section `direct`); the command sets direct.method
    dpo = _stage_parser(sub, "dpo", DirectConfig, "direct preference optimisation on pairs (DPO, IPO, hinge, robust, cDPO, SimPO)")
    dpo.add_argument("--loss", choices=("sigmoid", "ipo", "ipo_avg", "hinge", "robust", "cdpo", "simpo"), default=None,
                     help="direct.loss_type (default sigmoid = DPO; simpo needs no reference model)")
    dpo.get_default("flag_keys")["loss"] = "direct.loss_type"
    kto = _stage_parser(sub, "kto", DirectConfig, "KTO on unpaired desirable/undesirable examples (or pairs, unpaired)")
    _stage_parser(sub, "orpo", DirectConfig, "ORPO on pairs: SFT on chosen + odds-ratio loss, no reference model")
    for p in (dpo, kto):
        p.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=None,
                       help="reference log-probs once before training, cached in OUT (default on)")
        p.get_default("flag_keys")["precompute_ref"] = "direct.precompute_ref"
    cai = sub.add_parser("cai", help="Constitutional AI: self-critique and revision (revise), an AI preference labeller (label)")
    cai_sub = cai.add_subparsers(dest="cai_command", required=True)
    rev = _stage_parser(cai_sub, "revise", CAIReviseConfig, "SL-CAI: answer, then rounds of critique and revision against a constitution")
    lab = _stage_parser(cai_sub, "label", CAILabelConfig, "RL-CAI: an AI labeller picks the better response of each pair (soft labels)")
    rev.set_defaults(stage="cai-revise")
    lab.set_defaults(stage="cai-label")
    for q in (rev, lab):
        _flags(q, {
            "constitution": ("constitution", str, "constitution YAML (default builtin:default; see tether.constitution)"),
            "feedback_url": ("feedback.url", str, "an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); default: a local model"),
            "feedback_model": ("feedback.model", str, "the local feedback model, or the model name the server expects"),
            "api_key_env": ("feedback.api_key_env", str, "name of the environment variable holding the server's API key"),
        })
    _flags(rev, {"rounds": ("rounds", int, "critique-revision rounds per prompt (default 2)"),
                 "categories": ("categories", str, "builtin:instruct prompt categories, e.g. harmful,lookalike")})
    _flags(lab, {"eval_data": ("eval_data", str, "held-out pairs, labelled the same way")})
    lab.add_argument("--cot", action="store_true", default=None, help="chain of thought first; the probability clamped to [0.4, 0.6]")
    lab.get_default("flag_keys")["cot"] = "ai.cot"
    p = sub.add_parser("serve", help="an OpenAI-compatible server (chat completions; /v1/rewards for a reward model)")
    p.add_argument("model", help="a causal LM (builtin:*, folder, hub id) or a reward model / ensemble folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default="", metavar="NAME", help="require `Authorization: Bearer $NAME` on every request")
    p.add_argument("--name", default=None, help="the model name clients use (default: MODEL as given)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--max-batch", type=int, default=64, help="sequences per engine call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long the batcher waits for more requests")
    ann = sub.add_parser("annotate", help="human preferences: a web app for pairwise comparisons, agreement, export")
    ann_sub = ann.add_subparsers(dest="annotate_command", required=True)
    q = ann_sub.add_parser("serve", help="the annotation web app")
    q.add_argument("--db", required=True, help="SQLite file or SQLAlchemy URL (e.g. postgresql://...)")
    q.add_argument("--pairs", action="append", default=[], help="pairs to label (tether label / cai output, or prompt + response_a/b); repeatable")
    q.add_argument("--gold", action="append", default=[], help="gold items: chosen/rejected pairs whose chosen is known to be better")
    q.add_argument("--overlap", type=int, default=2, help="annotators per pair (default 2)")
    q.add_argument("--gold-rate", type=float, default=0.0, help="share of assignments that are gold items (default 0)")
    q.add_argument("--reward-model", default="", help="active selection: serve first the pairs this reward model (or ensemble) is least sure of")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=int, default=8765)
    q.add_argument("--admin-token-env", default="", metavar="NAME", help="environment variable holding the admin token (/admin)")
    q.add_argument("--guidelines", default="", help="a text file shown to annotators")
    q = ann_sub.add_parser("add-annotator", help="create an annotator and print their sign-in link (the token is shown once)")
    q.add_argument("name")
    q.add_argument("--db", required=True)
    q.add_argument("--url", default="http://127.0.0.1:8765", help="the app's address, for the sign-in link")
    for name, h in (("status", "progress per annotator"), ("agreement", "agreement statistics: kappa, alpha, gold, position bias")):
        q = ann_sub.add_parser(name, help=h)
        q.add_argument("--db", required=True)
    q = ann_sub.add_parser("export", help="preference data for tether rm and the direct methods")
    q.add_argument("--db", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--keep-ties", action="store_true", help="count a tie vote half to each side; keep 0.5 pairs")
    q.add_argument("--kto", action="store_true", help="KTO's unpaired format (prompt, completion, label)")
    q.add_argument("--datasets-folder", default="", metavar="DIR", help="also save the rows as a `datasets` folder (save_to_disk)")
    p = sub.add_parser("run", help="run a pipeline recipe (stages sft, label, rm, ppo, eval, ...); finished stages are skipped")
    p.add_argument("recipe", help="pipeline recipe YAML (see src/tether/recipes/quickstart.yaml)")
    p.add_argument("--out", default=None, help="run folder (default: the recipe's `out`)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun this stage even if it finished (repeatable)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage's config key, e.g. --set ppo.train.max_steps=10 (repeatable)")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    p = sub.add_parser("quickstart", help="the README's main job: base -> SFT -> label -> RM -> PPO -> eval -> report")
    p.add_argument("--fast", action="store_true", help="a first look in a few minutes: fewer prompts and steps")
    p.add_argument("--out", default=None, help="run folder (default runs/quickstart, or runs/quickstart-fast)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun this stage even if it finished")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override a stage's config key, e.g. --set ppo.train.max_steps=20 (repeatable)")
    p = sub.add_parser("report", help="write RUN/report/index.html (self-contained) and PNGs for a run folder")
    p.add_argument("run", help="a `tether run` folder (or a single stage's output folder)")
    p.add_argument("--out", default=None, help="report folder (default RUN/report)")
    sub.add_parser("env", help="print versions and CPU features for bug reports")
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="tether: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # tether draws its own progress bars; transformers' per-load bars are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _run_stage(args) -> int:
    from tether.config import load_config

    overrides = {key: getattr(args, flag) for flag, key in args.flag_keys.items()}
    if args.command in ("kto", "orpo") and args.out is None and args.config is None:
        overrides["train.out"] = f"runs/{args.command}"  # DirectConfig's default out is runs/dpo
    cfg = load_config(args.config_cls, args.config, overrides, args.sets)
    if args.print_config:
        from tether.config import describe

        print(describe(cfg), end="")
        return 0
    stage = getattr(args, "stage", args.command)
    if stage in ("cai-revise", "cai-label"):
        from tether.stages import cai

        if stage == "cai-revise":
            s = cai.revise(cfg)
            print(cai.format_revise_report(s))
        else:
            s = cai.label(cfg)
            print(cai.format_label_report(s))
    elif args.command == "sft":
        from tether.stages import sft

        s = sft.train(cfg)
        if s["status"] == "done":
            print(f"tether: done. model: {s['model']}  eval loss {s['eval/loss_initial']:.4f} -> {s['eval/loss']:.4f}  ({s['wall_time_s']:.0f} s)")
    elif args.command == "label":
        from tether.stages import label

        s = label.run_label(cfg)
        print(label.format_report(s))
    elif args.command == "rm":
        from tether.stages import rm

        s = rm.train(cfg)
        if s["status"] == "done":
            acc = f"  eval accuracy {s['eval/accuracy']:.3f}" if "eval/accuracy" in s else ""
            if "members" in s:
                each = [f"{m['eval/accuracy']:.3f}" for m in s["members"] if "eval/accuracy" in m]
                acc += f" (members {' '.join(each)})" if each else ""
                print(f"tether: done. reward-model ensemble of {s['ensemble']}: {s['model']}{acc}  ({s['wall_time_s']:.0f} s)")
            else:
                print(f"tether: done. reward model: {s['model']}{acc}  ({s['wall_time_s']:.0f} s)")
    elif args.command == "ppo":
        from tether.stages import ppo

        s = ppo.train(cfg)
        if s["status"] == "done":
            held = "".join(f"  held-out {k[5:]} {s[k + '_initial']:.3f} -> {s[k]:.3f}" for k in ("eval/gold", "eval/score")
                           if k in s and k + "_initial" in s)
            print(f"tether: done. policy: {s['model']}{held}  ({s['wall_time_s']:.0f} s)")
    elif args.command in ("dpo", "kto", "orpo"):
        from tether.stages import direct

        s = direct.train(direct.with_method(cfg, args.command))
        if s["status"] == "done":
            acc = (f"  eval reward accuracy {s['eval/rewards/accuracies_initial']:.3f} -> {s['eval/rewards/accuracies']:.3f}"
                   if "eval/rewards/accuracies" in s else "")
            print(f"tether: done. model: {s['model']}{acc}  ({s['wall_time_s']:.0f} s)")
    elif args.command == "eval":
        from tether.stages import evaluate

        s = evaluate.evaluate(cfg)
        print(evaluate.format_table(s))
    else:
        from tether.stages import eval_rm

        s = eval_rm.evaluate_rm(cfg)
        print(eval_rm.format_report(s))
    return 130 if s["status"] == "interrupted" else 0


TRAINERS = ("sft", "rm", "ppo", "dpo", "kto", "orpo")  # the commands that run under accelerate launch / torchrun


def _setup_world(command: str) -> str:
    """Under a multi-process launcher: refuse the commands that run in one process, and quiet every rank
    but 0 (its logs, progress bars and final line would repeat rank 0's). Returns the error-line prefix."""
    from tether import distributed

    if not distributed.launched():
        return ""
    if command not in TRAINERS:
        raise TetherError(f"tether {command} runs in one process: launch only the trainers ({', '.join(TRAINERS)}) "
                          "with accelerate launch / torchrun, and the other stages with plain `tether`")
    w = distributed.world()
    if not w.is_main:
        os.environ["TQDM_DISABLE"] = "1"
        logging.getLogger().setLevel(logging.ERROR)
        sys.stdout = open(os.devnull, "w")  # the final report lines: rank 0 prints them
    return f"(rank {w.rank}) " if w.size > 1 else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    code = _main(args)
    from tether import distributed

    if distributed.launched() and distributed.world.cache_info().currsize:  # a launch: the process group torn down,
        sys.stdout.flush()                                                  # together after a finished or stopped run
        distributed.world().close(wait=code in (0, 130))
    return code


def _main(args) -> int:
    rank = ""
    try:
        rank = _setup_world(args.command)
        if args.command == "env":
            from tether.envinfo import env_report

            print(env_report())
            return 0
        if args.command in ("run", "quickstart"):
            from tether import pipeline

            if args.command == "quickstart":
                return pipeline.quickstart(fast=args.fast, out=args.out, force=args.force, sets=args.sets)
            return pipeline.run(args.recipe, out=args.out, force=args.force, sets=args.sets, report=not args.no_report)
        if args.command == "annotate":
            from tether.annotate import commands as ac

            c = args.annotate_command
            if c == "serve":
                ac.serve(args.db, args.pairs, args.gold, args.overlap, args.gold_rate, args.reward_model, args.host, args.port,
                         args.admin_token_env, args.guidelines)
            elif c == "add-annotator":
                print(ac.add_annotator(args.db, args.name, args.url))
            elif c == "status":
                print(ac.status(args.db))
            elif c == "agreement":
                print(ac.agreement(args.db))
            else:
                print(ac.export(args.db, args.out, args.keep_ties, args.kto, args.datasets_folder))
            return 0
        if args.command == "serve":
            from tether.serve import serve

            serve(args.model, host=args.host, port=args.port, api_key_env=args.api_key_env, name=args.name, dtype=args.dtype,
                  max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
            return 0
        if args.command == "report":
            from tether.report import write_report

            print(f"tether: report written to {write_report(args.run, args.out)}")
            return 0
        return _run_stage(args)
    except TetherError as e:
        print(f"tether: error: {rank}{e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"tether: training diverged: {rank}{e}", file=sys.stderr)
        return 3



if __name__ == "__main__":
    raise SystemExit(main())
