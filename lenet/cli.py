"""The `lenet` command: each subcommand parses its flags and calls one library function.

Nothing heavy is imported at module level, so `lenet --help` and argument errors answer at once.
Errors a user can cause print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from lenet.errors import LenetError

MODEL_CHOICES = ("classic", "modern")
DATASET_CHOICES = ("mnist", "fashion-mnist")


def cmd_summary(args: argparse.Namespace) -> int:
    from lenet.models import build, layer_table

    model = build(args.model)
    try:
        rows = layer_table(model, (1, *args.input_size), batch=args.batch)
    except ValueError as e:
        raise LenetError(f"--input-size: {e}") from None
    width = max(len(name) for name, _, _ in rows)
    print(f"{args.model}: input {args.batch}x1x{args.input_size[0]}x{args.input_size[1]}")
    print(f"{'layer':<{width}}  {'output shape':<16} {'params':>8}")
    for name, shape, params in rows:
        print(f"{name:<{width}}  {'x'.join(map(str, shape)):<16} {params:>8,}")
    print(f"{'total':<{width}}  {'':<16} {sum(p for _, _, p in rows):>8,}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lenet import data

    log = (lambda line: print(line, file=sys.stderr)) if args.verbose or args.action == "fetch" else None
    report = (
        data.fetch(args.dataset, args.data_dir, log=log)
        if args.action == "fetch"
        else data.info(args.dataset, args.data_dir)
    )
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lenet.train import TrainConfig, fit

    cfg = TrainConfig.for_model(
        args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        out=args.out,
        resume=args.resume,
        compile=args.compile,
        sync_batchnorm=args.sync_batchnorm,
        max_steps_per_epoch=args.max_steps_per_epoch,
    )
    result = fit(cfg, log=lambda line: print(line, file=sys.stderr))
    if result.get("rank", 0) == 0:
        print(f"test accuracy {result['test_acc']:.4f} (best {result['best_test_acc']:.4f})")
        print(f"checkpoint {result['last']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lenet.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint, data_dir=args.data_dir, device=args.device, out_dir=args.out
    )
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "text"}))
    else:
        print(report["text"])
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lenet import bench

    result = bench.run(args.suite, quick=args.quick)
    print(json.dumps(result) if args.json else bench.format_result(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lenet", description="LeNet-5: train, inspect, use and ship it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="per-layer output shapes and parameter counts")
    p.add_argument("--model", default="classic", choices=MODEL_CHOICES)
    p.add_argument("--input-size", nargs=2, type=int, default=(28, 28), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("data", help="get and verify a dataset; show where it came from")
    p.add_argument("action", choices=("fetch", "info"))
    p.add_argument("--dataset", default="mnist", choices=DATASET_CHOICES)
    p.add_argument("--data-dir", help="a folder holding the four IDX files (raw or .gz)")
    p.add_argument("-v", "--verbose", action="store_true", help="report each source tried")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a model (also under torchrun, data-parallel)")
    p.add_argument("--model", default="classic", choices=MODEL_CHOICES)
    p.add_argument("--dataset", default="mnist", choices=DATASET_CHOICES)
    p.add_argument("--data-dir", help="a folder holding the four IDX files (raw or .gz)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size, split across torchrun processes")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"))
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--schedule", choices=("constant", "step", "cosine", "one-cycle"))
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--out", help="run folder (default runs/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow start, faster steps)"
    )
    p.add_argument(
        "--sync-batchnorm", action="store_true", help="under torchrun: batch norm over all processes"
    )
    p.add_argument("--max-steps-per-epoch", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class table and confusion matrix of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--out", help="folder for the confusion matrix PNG (default: beside the checkpoint)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="speed, always beside a baseline measured in the same run")
    p.add_argument("suite", choices=("train",))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer steps (for smoke tests)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LenetError as e:
        print(f"lenet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lenet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
