"""The `tether` command: parse flags, build a config, call one stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys

from tether.errors import TetherError, TrainingDiverged

# plain flags for the common keys -> dotted config keys
COMMON_FLAGS = {
    "model": ("model.name", str, "model: builtin:smollm2-135m-instruct, builtin:tiny, a folder or a hub id"),
    "data": ("data.path", str, "training data (JSONL/JSON/Parquet/CSV/datasets folder, or builtin:demos)"),
    "eval_data": ("data.eval_path", str, "held-out data (default: data.eval_fraction of --data)"),
    "out": ("train.out", str, "output folder"),
    "seed": ("train.seed", int, None),
    "max_steps": ("train.max_steps", int, "optimizer steps (default: from train.epochs)"),
    "epochs": ("train.epochs", float, None),
    "lr": ("train.lr", float, "learning rate"),
    "batch_size": ("train.batch_size", int, "examples per micro-batch"),
    "grad_accum": ("train.grad_accum", int, "micro-batches per optimizer step"),
    "max_length": ("data.max_length", int, "max tokens per example"),
    "lora_r": ("model.lora_r", int, "LoRA rank (0 = full fine-tuning)"),
    "dtype": ("model.dtype", str, "auto | fp32 | bf16"),
    "report_to": ("train.report_to", str, "none | tensorboard | wandb | mlflow"),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe with model/data/train sections")
    for name, (_, tp, help_) in COMMON_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=tp, help=help_)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.warmup_steps=10 (repeatable)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint in --out")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                   help="with LoRA, write merged weights to OUT/model (default on)")
    p.add_argument("--packing", action="store_true", default=None, help="pack several examples per row")
    p.add_argument("--verbose", action="store_true", default=None, help="show a rendered example and more logs")


def _overrides(args) -> dict:
    o = {key: getattr(args, name) for name, (key, _, _) in COMMON_FLAGS.items()}
    o.update({"train.resume": args.resume, "model.merge": args.merge, "data.packing": args.packing,
              "train.verbose": args.verbose})
    return o


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description="RLHF on one machine: SFT, reward models, PPO, DPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (loss on assistant tokens)")
    _add_common(p)
    p = sub.add_parser("quickstart", help="the README's main job: SFT the embedded model, before/after table")
    p.add_argument("--fast", action="store_true", help="a few minutes: fewer steps, shorter evaluation")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--model", default=None, help="model to start from (default: the embedded SmolLM2-135M-Instruct)")
    sub.add_parser("env", help="print versions and CPU features for bug reports")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tether: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # tether draws its own progress bars; transformers' per-load bars are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        if args.command == "env":
            from tether.envinfo import env_report

            print(env_report())
            return 0
        if args.command == "quickstart":
            from tether.quickstart import quickstart

            return quickstart(out=args.out, fast=args.fast, model=args.model)
        if args.command == "sft":
            from tether.config import SFTConfig, load_config
            from tether.stages import sft

            cfg = load_config(SFTConfig, args.config, _overrides(args), args.sets)
            summary = sft.train(cfg)
            if summary["status"] == "interrupted":
                return 130
            print(f"tether: done. model: {summary['model']}  eval loss {summary['eval/loss_initial']:.4f} -> "
                  f"{summary['eval/loss']:.4f}  ({summary['wall_time_s']:.0f} s)")
            return 0
    except TetherError as e:
        print(f"tether: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"tether: training diverged: {e}", file=sys.stderr)
        return 3
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
