"""The `lenet` command: each subcommand parses its flags and calls one library function.

Nothing heavy is imported at module level, so `lenet --help` and argument errors answer at once.
Errors a user can cause print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

from lenet.config import DATASETS, DEVICES, MODELS, REPRODUCTIONS, flag, flag_fields
from lenet.errors import LenetError


def cmd_summary(args: argparse.Namespace) -> int:
    from lenet.models import build, summary

    try:
        table = summary(build(args.model), tuple(args.input_size), batch=args.batch)
    except ValueError as e:
        raise LenetError(f"--input-size: {e}") from None
    print(f"{args.model}: {table}")
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
    from lenet.train import fit

    options = {f.name: getattr(args, f.name) for f in flag_fields() if getattr(args, f.name) is not None}
    run = fit(options.pop("model", "classic"), log=lambda line: print(line, file=sys.stderr), **options)
    if run.rank == 0:
        if run.chosen_epoch is None:
            print("no epoch finished: nothing saved")
        else:
            how = (
                f"chosen on {run.config.val_split:,} validation images"
                if run.config.val_split
                else "the last (no validation split)"
            )
            print(
                f"test accuracy {run.test_acc:.4f} (epoch {run.chosen_epoch} of {run.config.epochs}, {how})"
            )
            print(f"checkpoint {run.checkpoint}")
    return 130 if run.interrupted else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lenet.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint, data_dir=args.data_dir, device=args.device, out_dir=args.out
    )
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "text"}))
    else:
        print(report["text"])
        for path in report["plots"].values():
            print(f"wrote {path}")
    if not report["plots"]:
        from lenet.plots import MISSING

        print(f"lenet: {MISSING}", file=sys.stderr)
    return 0


def backend_of(model_path: str, backend: str) -> str:
    """ "auto" picks ONNX Runtime for .onnx files and PyTorch for checkpoints."""
    if backend == "auto":
        return "onnxruntime" if model_path.lower().endswith(".onnx") else "torch"
    return backend


def _images_and_classifier(args: argparse.Namespace):
    """The image paths of `predict` and `read` (files, folders, globs, "-" once), and the classifier."""
    from lenet.imagefiles import expand_paths, load_classifier

    paths = expand_paths(args.paths)
    if paths.count("-") > 1:
        raise LenetError("-: stdin holds one image; name it once")
    classify, classes = load_classifier(
        args.checkpoint, backend_of(args.checkpoint, args.backend), args.device
    )
    return paths, classify, classes


def cmd_predict(args: argparse.Namespace) -> int:
    from lenet.imagefiles import predict_files, top_k

    paths, classify, classes = _images_and_classifier(args)
    if not 1 <= args.top_k <= len(classes):
        raise LenetError(f"--top-k: expected 1 to {len(classes)}, got {args.top_k}")
    failed = 0
    rows = predict_files(classify, paths, invert=args.invert, workers=args.workers)
    for row in rows:
        error, probabilities = row.get("error"), row.get("probabilities")
        best = top_k(probabilities, args.top_k, classes) if probabilities else []
        failed += error is not None
        if args.json:
            digit = best[0][0] if best else None
            fields = {"path": row["path"], "digit": digit, "probabilities": probabilities, "error": error}
            if args.top_k > 1:
                fields["top_k"] = best
            print(json.dumps(fields))
        elif error:
            print(f"lenet: error: {error}", file=sys.stderr)
        else:
            print(f"{row['path']}: " + ", ".join(f"{name} {p:.3f}" for name, p in best))
    return 1 if failed else 0


def cmd_read(args: argparse.Namespace) -> int:
    from lenet.read import read_number

    paths, classify, classes = _images_and_classifier(args)
    stdin = sys.stdin.buffer.read() if "-" in paths else None
    failed = 0
    for path in paths:
        name = "<stdin>" if path == "-" else path
        try:
            result = read_number(stdin if path == "-" else path, classify, args.invert, name, classes)
        except LenetError as e:
            failed += 1
            if args.json:
                print(json.dumps({"path": path, "number": None, "digits": None, "error": str(e)}))
            else:
                print(f"lenet: error: {e}", file=sys.stderr)
            continue
        if args.json:
            keys = ("digit", "probability", "probabilities", "box")
            digits = [{key: digit[key] for key in keys} for digit in result["digits"]]
            size = {"width": result["width"], "height": result["height"]}
            print(
                json.dumps(
                    {"path": path, "number": result["number"], "digits": digits, **size, "error": None}
                )
            )
        else:
            print(f"{path}: {result['number']}")
    return 1 if failed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from lenet.classifier import load
    from lenet.preprocess import preprocess

    clf = load(args.checkpoint, args.device)
    name = "<stdin>" if args.image == "-" else args.image
    image = preprocess(sys.stdin.buffer.read() if args.image == "-" else args.image, args.invert, name)
    explanation = clf.explain(image, title=f"{name}: {clf.meta['model']['name']} says {{label}}")
    out = explanation.save(args.out)
    answer = explanation.prediction
    print(f"{args.image}: {answer.label} {answer.probability:.3f}; wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lenet import export

    report = export.export(
        args.checkpoint, args.format, out=args.out, quantize=args.quantize, data_dir=args.data_dir
    )
    print(json.dumps(report) if args.json else export.format_report(report))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from lenet import reproduce

    path = reproduce.run(
        args.name,
        seeds=args.seeds,
        smoke=args.smoke,
        runs_dir=args.runs_dir,
        out=args.out,
        data_dir=args.data_dir,
        device=args.device,
        resume=args.resume,
        only=tuple(args.only) if args.only else None,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(f"report {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lenet.serve import serve

    backend = backend_of(args.checkpoint, args.backend)
    serve(args.checkpoint, host=args.host, port=args.port, backend=backend, workers=args.workers)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lenet import bench

    result = bench.run(args.suite, quick=args.quick, device=args.device)
    print(json.dumps(result) if args.json else bench.format_result(result))
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


_FLAG_TYPES = {"int": int, "float": float, "str": str, "dict": _json_object}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (lenet/config.py is the one place they are defined); every default
    is None, so that only the flags given reach TrainConfig and the rest come from the model's recipe."""
    for f in flag_fields():
        help_text = f.metadata["help"] or argparse.SUPPRESS
        if f.metadata["help"] and f.default not in (None, False, {}, dataclasses.MISSING):
            help_text += f" (default {f.default})"
        kind = str(f.type).split("|")[0].strip()
        if kind == "bool":
            parser.add_argument(flag(f.name), dest=f.name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                flag(f.name),
                dest=f.name,
                type=_FLAG_TYPES[kind],
                choices=f.metadata["choices"],
                help=help_text,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lenet", description="LeNet-5: train, inspect, use and ship it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _training_commands(sub)
    _checkpoint_commands(sub)
    _image_commands(sub)
    p = sub.add_parser("bench", help="speed, always beside a baseline measured in the same run")
    p.add_argument("suite", choices=("train", "export", "predict", "serve"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer steps (for smoke tests)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="train only: where to train")
    p.set_defaults(func=cmd_bench)
    return parser


def _training_commands(sub) -> None:
    p = sub.add_parser("summary", help="per-layer output shapes and parameter counts")
    p.add_argument("--model", default="classic", choices=MODELS)
    p.add_argument("--input-size", nargs=2, type=int, default=(28, 28), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("data", help="get and verify a dataset; show where it came from")
    p.add_argument("action", choices=("fetch", "info"))
    p.add_argument("--dataset", default="mnist", choices=DATASETS)
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="report each source tried")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a model (also under torchrun, data-parallel)")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("reproduce", help="train published networks; write our numbers beside theirs")
    p.add_argument("name", choices=REPRODUCTIONS)
    p.add_argument("--seeds", type=int, default=1, help="runs per network (seeds 0..N-1)")
    p.add_argument("--smoke", action="store_true", help="a few batches per run: checks the code path only")
    p.add_argument("--runs-dir", default="runs/reproduce", help="one run folder per network and seed here")
    p.add_argument("--out", help="report path (default docs/reproduce-NAME.md, docs/improvements.md)")
    p.add_argument("--only", nargs="+", metavar="KEY", help="train only these rows (e.g. lenet5 lenet1)")
    p.add_argument("--resume", action="store_true", help="continue runs from their last checkpoints")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.set_defaults(func=cmd_reproduce)


def _checkpoint_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class table and confusion matrix of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--out", help="folder for the confusion matrix PNG (default: beside the checkpoint)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="ONNX or TorchScript, checked on the test set before it is written")
    p.add_argument("checkpoint")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"))
    p.add_argument("-o", "--out", help="output file (default: beside the checkpoint, e.g. best.onnx)")
    p.add_argument("--quantize", choices=("int8",), help="ONNX only: int8 weights and activations")
    p.add_argument("--data-dir", help="a folder holding the test set's IDX files (raw or .gz)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="the draw-a-digit page and HTTP API (FastAPI + uvicorn)")
    p.add_argument("checkpoint", help="a checkpoint, or an .onnx export (served with onnxruntime)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _backend_flag(p)
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default 1; "
                   "more than one per CPU does not help)")  # fmt: skip
    p.set_defaults(func=cmd_serve)


def _image_commands(sub) -> None:
    p = sub.add_parser("predict", help="digit and probabilities for each image (files, folders, globs, -)")
    p.add_argument("checkpoint", help="a checkpoint, or an .onnx export (run with onnxruntime)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, globs; - reads stdin")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--top-k", type=int, default=1, help="how many classes to show per image")
    p.add_argument("--workers", type=int, help="preprocessing processes (default: one per CPU if many)")
    _image_flags(p)
    _backend_flag(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("read", help="the number written in each image (one line of digits, any count)")
    p.add_argument("checkpoint", help="a checkpoint, or an .onnx export (run with onnxruntime)")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files, folders, globs; - reads stdin")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per image: digits, probabilities, boxes"
    )
    _image_flags(p)
    _backend_flag(p)
    p.set_defaults(func=cmd_read)

    p = sub.add_parser("explain", help="one figure: input, feature maps, filters and probabilities")
    p.add_argument("checkpoint")
    p.add_argument("image", help="an image file, or - for stdin")
    p.add_argument("-o", "--out", default="explain.png", help="PNG to write (default explain.png)")
    _image_flags(p)
    p.set_defaults(func=cmd_explain)


DATA_DIR_HELP = "a folder holding the four IDX files (raw or .gz)"


def _image_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--invert", default="auto", choices=("auto", "yes", "no"), help="yes: dark ink on light")
    p.add_argument("--device", default="cpu", choices=DEVICES)


def _backend_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime"),
                   help="auto: onnxruntime for .onnx files, else torch")  # fmt: skip


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
    except BrokenPipeError:
        # the reader went away (`lenet predict ... | head`): not an error; stop quietly, as `yes | head` does,
        # with nowhere left for Python's own flush at exit to complain to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + int(getattr(signal, "SIGPIPE", 13))


if __name__ == "__main__":
    sys.exit(main())
