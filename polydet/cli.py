"""The ``polydet`` command line: thin wrappers over the stage functions (one code path).

Each subcommand parses its arguments, loads ``params.yaml`` (``--params``, ``--set
section.key=value`` overrides) and calls one library function. Data and configuration
problems end with a one-line error naming the file (and line), exit code 2, no traceback.
Imports are lazy so that ``polydet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from polydet.core.config import Config, load_config
from polydet.core.errors import PolydetError


class UserError(PolydetError):
    """A problem with the command line's options."""


def _cfg(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.set)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --- subcommands -------------------------------------------------------------------------
# Each _cmd_* is owned by the module it calls; keep them a few lines long.


def _cmd_synth(args: argparse.Namespace) -> None:
    from polydet.data.synth import generate

    cfg = _cfg(args)
    out = generate(cfg.synth, Path(args.out) if args.out else None)
    print(f"synthetic dataset ({cfg.synth.num_images} images, DOTA labels) written to {out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from polydet.data.prepare import format_summary, prepare

    result = prepare(_cfg(args))
    print(format_summary(result))
    print(f"  details: {Path(result['out']) / 'import_summary.json'}, stats.md")


def _cmd_anchors(args: argparse.Namespace) -> None:
    from polydet.train.anchors import configure_anchors

    _print_json(configure_anchors(_cfg(args)))


def _cmd_train(args: argparse.Namespace) -> None:
    import os

    from polydet.train.engine import train

    result = train(_cfg(args), resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary (rank 0's)
        _print_json(result)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from polydet.eval import evaluate

    if args.format:
        if not (args.detections and args.annotations):
            raise UserError("--format dota needs --detections DIR and --annotations DIR")
        classes = args.classes.split(",") if args.classes else None
        result = evaluate.evaluate_dota_dirs(
            Path(args.detections),
            Path(args.annotations),
            classes=classes,
            iou_threshold=args.iou_threshold,
        )
        _print_json(result)
        return
    cfg, net = _cfg(args), None
    if args.runtime == "onnx":  # the model as it ships: its export on ONNX Runtime
        from polydet.deploy.export import OnnxDetector
        from polydet.deploy.onnx_runtime import export_dir

        if args.model is None:
            raise UserError("--runtime onnx needs --model DIR (the output of `polydet export`)")
        net = OnnxDetector(export_dir(args.model), device=cfg.train.device)
    _print_json(evaluate.evaluate_model(cfg, model=args.model, net=net))


def _cmd_predict(args: argparse.Namespace) -> None:
    from polydet.deploy.predict import predict_paths

    cfg = _cfg(args)
    result = predict_paths(
        cfg,
        Path(args.input),
        model=args.model,
        out_dir=Path(args.out),
        score_thresh=args.score_thresh,
        runtime=args.runtime,
    )
    _print_json(result)


def _cmd_payload(args: argparse.Namespace) -> None:
    from polydet.tracking.pyfunc import serving_payload

    print(json.dumps(serving_payload(args.images, args.score_thresh)))


def _cmd_serve(args: argparse.Namespace) -> None:
    import os

    from polydet.tracking.pyfunc import serve_command

    cfg = _cfg(args)
    model = args.model or f"models:/{cfg.tracking.model_name}@champion"
    cmd, env = serve_command(cfg, model, args.host, args.port)
    print(f"MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']} {' '.join(cmd)}", file=sys.stderr)
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)  # the server replaces this process (Ctrl-C stops it)


def _cmd_export(args: argparse.Namespace) -> None:
    from polydet.deploy.export import export

    _print_json(export(_cfg(args), model=args.model, fmt=args.format, out_dir=Path(args.out)))


def _cmd_debug(args: argparse.Namespace) -> None:
    from polydet.debug.report import debug_report

    _print_json(debug_report(_cfg(args), model=args.model))


def _cmd_promote(args: argparse.Namespace) -> None:
    from polydet.tracking.registry import promote

    _print_json(promote(_cfg(args), version=args.version, reason=args.reason))


def _cmd_rollback(args: argparse.Namespace) -> None:
    from polydet.tracking.registry import rollback

    _print_json(rollback(_cfg(args), reason=args.reason))


def _cmd_register(args: argparse.Namespace) -> None:
    from polydet.tracking.registry import record_and_register

    _print_json(record_and_register(_cfg(args)))


def _cmd_pipeline(args: argparse.Namespace) -> None:
    from polydet.pipeline.prefect_env import use_project_prefect

    use_project_prefect()  # before Prefect is imported: it reads its settings once
    from polydet.pipeline.flow import polydet_pipeline

    _print_json(polydet_pipeline(params=args.params, overrides=list(args.set)))


def _cmd_dvc_yaml(args: argparse.Namespace) -> None:
    from polydet.pipeline.dvc_yaml import write_dvc_yaml

    same = write_dvc_yaml(_cfg(args), args.out, check=args.check)
    if args.check and not same:
        raise UserError(f"{args.out}: differs from the stage table; run `polydet dvc-yaml`")
    print(f"{args.out}: {'up to date' if same else 'written'}")


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polydet", description="Two-stage quadrilateral (polybox) object detection."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--params", default="params.yaml", help="settings file (params.yaml)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one setting (repeatable), e.g. --set train.lr=0.01",
        )
        p.set_defaults(func=fn)
        return p

    p = add("synth", _cmd_synth, "write the synthetic dataset (DOTA format) from params.synth")
    p.add_argument("--out", help="output directory (default: synth.out)")
    add("prepare", _cmd_prepare, "read, validate, tile and split the raw dataset")
    add("anchors", _cmd_anchors, "fit anchor sizes/ratios to the data; coverage report")
    p = add("train", _cmd_train, "train the detector (CUDA if present, else CPU)")
    p.add_argument("--resume", help="checkpoint to resume from ('last' = train.out's last)")
    p = add("evaluate", _cmd_evaluate, "polygon-IoU mAP of a model or of DOTA Task1 files")
    p.add_argument("--model", help="model file or MLflow models:/ URI (default: train.out)")
    p.add_argument("--format", choices=["dota"], help="evaluate result files of any detector")
    p.add_argument("--detections", help="directory of Task1_<class>.txt files")
    p.add_argument("--annotations", help="directory of DOTA labelTxt files")
    p.add_argument("--classes", help="comma-separated classes (default: those found)")
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument(
        "--runtime", choices=["torch", "onnx"], default="torch",
        help="onnx: the model as it ships, on ONNX Runtime (--model DIR of `polydet export`,"
        " or a models:/ URI whose version carries one)",
    )  # fmt: skip
    p = add("predict", _cmd_predict, "detect polyboxes in an image or a directory of images")
    p.add_argument("input", help="an image file or a directory of images")
    p.add_argument("--model", required=True, help="model file or models:/NAME@ALIAS URI")
    p.add_argument("--out", default="outputs/predict", help="output directory")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument(
        "--runtime", choices=["torch", "onnx"], default="torch",
        help="onnx: ONNX Runtime on an export (--model DIR of `polydet export`, its model.onnx,"
        " or a models:/ URI whose version carries one)",
    )  # fmt: skip
    p = add("payload", _cmd_payload, "print a request body for the served model (JSON)")
    p.add_argument("images", nargs="+", help="image files, one row each (base64)")
    p.add_argument("--score-thresh", type=float, help="the request's score_thresh parameter")
    p = add("serve", _cmd_serve, "serve a registered model over HTTP (mlflow models serve)")
    p.add_argument("--model", help="model URI (default: models:/<tracking.model_name>@champion)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p = add("export", _cmd_export, "export a model to ONNX or TorchScript (post-processing inside)")
    p.add_argument("--model", help="model file or models:/NAME@ALIAS URI (default: train.out)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", default="outputs/export", help="output directory")
    p = add("debug", _cmd_debug, "loss / matching / IoU debugging report for a model")
    p.add_argument("--model", help="model file (default: train.out)")
    add("register", _cmd_register, "log the outputs to MLflow, register the model, apply the gate")
    p = add("promote", _cmd_promote, "give a registered model version the champion alias")
    p.add_argument("version", help="model version number")
    p.add_argument("--reason", default="promoted by hand")
    p = add("rollback", _cmd_rollback, "give champion back to the previous champion")
    p.add_argument("--reason", default="rolled back by hand")
    add("pipeline", _cmd_pipeline, "run the whole Prefect pipeline once")
    p = add("dvc-yaml", _cmd_dvc_yaml, "write dvc.yaml from the stage table (polydet.stages)")
    p.add_argument("--out", default="dvc.yaml", help="the file to write (default dvc.yaml)")
    p.add_argument("--check", action="store_true", help="only check it is up to date")
    return parser


# Commands that write the project's outputs: one at a time per project (polydet.core.locks).
LOCKED_COMMANDS = frozenset(
    {"synth", "prepare", "anchors", "train", "evaluate", "debug", "register", "pipeline"}
)


def main(argv: Sequence[str] | None = None) -> int:
    from polydet.core.files import describe_os_error
    from polydet.core.locks import project_lock

    args = build_parser().parse_args(argv)
    # evaluate --format dota reads other files and writes nothing of the project's.
    locked = args.command in LOCKED_COMMANDS and not getattr(args, "format", None)
    try:
        with project_lock() if locked else contextlib.nullcontext():
            args.func(args)
    except PolydetError as e:
        print(f"polydet {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:  # the disk or the file system, not the code: one line, no traceback
        print(f"polydet {args.command}: error: {describe_os_error(e, verb='')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"polydet {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
