"""`loraplex train`: the offline QLoRA trainer's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from adapters.train.config import SCHEDULES, TrainConfig, TrainError
from adapters.train.data import OVERLONG, DataError
from adapters.train.tasks import TASKS

log = logging.getLogger("loraplex.train")
DEFAULTS = TrainConfig()


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The trainer's own options (hyperparameters, data, output, resume, register)."""
    from server.cli import MODEL_FIELDS, add_config_args

    add_config_args(parser, MODEL_FIELDS)
    d = DEFAULTS
    io = parser.add_argument_group("data and output")
    io.add_argument(
        "--data", type=Path, required=True, help="JSONL: messages | prompt+completion | text"
    )
    io.add_argument("--out", type=Path, required=True, help="adapter folder to create")
    io.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    io.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint of --out"
    )
    io.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        help="checkpoint interval in steps (0: none)",
    )
    io.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the checkpoint folder at the end"
    )
    io.add_argument("--max-len", type=int, default=d.max_len, help="max tokens per example")
    io.add_argument(
        "--overlong", choices=OVERLONG, default=d.overlong, help="what to do with longer examples"
    )
    io.add_argument("--strict", action="store_true", help="stop on any invalid data line")
    io.add_argument(
        "--eval-split",
        type=float,
        default=d.eval_split,
        help="held-out fraction (<1) or count (>=1)",
    )
    io.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="eval interval in steps (0: start and end)",
    )
    io.add_argument(
        "--task", choices=sorted(TASKS), help="score a demo task on held-out prompts at the end"
    )
    io.add_argument(
        "--task-n", type=int, default=d.task_n, help="held-out prompts --task scores (1..200)"
    )
    io.add_argument(
        "--register", metavar="URL", help="then load the adapter into the server at URL"
    )
    io.add_argument("--name", help="adapter name for --register (default: the --out folder name)")
    io.add_argument("--api-key", help="bearer token for --register (env LORAPLEX_API_KEY)")
    hp = parser.add_argument_group("hyperparameters")
    hp.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    hp.add_argument(
        "--alpha", type=float, default=d.alpha, help="LoRA alpha (scale = alpha / rank)"
    )
    hp.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    hp.add_argument(
        "--target-modules", default=d.target_modules, help="all-linear or comma-separated names"
    )
    hp.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    hp.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="after warmup")
    hp.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="default: 3%% of the steps"
    )
    hp.add_argument("--weight-decay", type=float, default=d.weight_decay)
    hp.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping"
    )
    hp.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training split")
    hp.add_argument(
        "--max-steps", type=int, default=d.max_steps, help="optimizer steps (overrides --epochs)"
    )
    hp.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch")
    hp.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step"
    )
    hp.add_argument("--seed", type=int, default=d.seed)
    hp.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=d.gradient_checkpointing,
        help="recompute activations in backward (less memory, slower)",
    )  # fmt: skip


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig named by parsed arguments."""
    names = TrainConfig.__dataclass_fields__.keys()
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> int:
    """Run `loraplex train`; exit 0 on success, 2 on bad input, 130 when interrupted."""
    import os

    from adapters.train.loop import Interrupted
    from adapters.train.register import register_adapter
    from adapters.train.trainer import train
    from server.cli import config_from_args

    try:
        cfg = train_config_from_args(args)
        result = train(
            config_from_args(args),
            cfg,
            args.data,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            keep_checkpoints=args.keep_checkpoints,
        )
    except KeyboardInterrupt:
        print(
            "loraplex: interrupted; continue from the last checkpoint with --resume",
            file=sys.stderr,
        )
        return 130
    except Interrupted as error:
        print(f"loraplex: {error}", file=sys.stderr)
        return 130
    except (TrainError, DataError) as error:
        print(f"loraplex: error: {error}", file=sys.stderr)
        return 2
    results = result.manifest["results"]
    summary = {k: results.get(k) for k in ("steps", "train_loss", "eval_loss", "tokens_per_s")}
    if "task" in results:
        summary |= {
            "task_score": results["task"]["score"],
            "base_score": results["task"]["base_score"],
        }
    print(json.dumps(summary))
    if args.register:
        name = args.name or result.out.name
        key = args.api_key or os.environ.get("LORAPLEX_API_KEY")
        try:
            register_adapter(args.register, name, result.out, api_key=key)
        except RuntimeError as error:
            print(f"loraplex: error: {error}", file=sys.stderr)
            return 1
        log.info("registered %s at %s", name, args.register)
    print(result.out)
    return 0


def register(sub: argparse._SubParsersAction, handlers: dict[str, Callable[..., int]]) -> None:
    """Add the `train` subcommand."""
    parser = sub.add_parser(
        "train",
        help="train a LoRA adapter (QLoRA on the NF4 base) from JSONL data",
        description="Train a PEFT LoRA adapter on the exact NF4 base the server serves.",
    )
    add_train_args(parser)
    handlers["train"] = cmd_train
