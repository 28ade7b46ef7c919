"""The ``kubetune`` command.

    kubetune crd                      print the FineTuneJob CRD (generated from the API models)
    kubetune crd --kind FineTuneSweep print the FineTuneSweep CRD
    kubetune validate -f job.yaml     check manifests (FineTuneJobs, FineTuneSweeps) as the
                                      operator will
    kubetune docs                     print the field reference (docs/reference.md)
    kubetune docs --kind FineTuneSweep  the sweep's field reference (docs/sweep-reference.md)
    kubetune tiny-model DIR           build a tiny offline model, tokenizer and dataset
    kubetune train -f job.yaml        run a FineTuneJob locally, no cluster needed
    kubetune sweep -f sweep.yaml      run a FineTuneSweep locally, one trial after another
    kubetune operator                 run the operator (in the cluster, or against a kubeconfig)

The trainer is imported only by the commands that train, so ``crd`` and ``validate``
work with the operator's dependencies alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .api.crd import CRDS, crd_yaml
from .api.sweep import KIND as SWEEP_KIND
from .api.sweep import parse_sweep
from .api.validation import InvalidManifest, parse_manifest
from .manifests import ManifestFileError, read_documents


def _cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml(args.kind))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    failures = 0
    for path in args.filename:
        try:
            documents = read_documents(path)
        except ManifestFileError as error:
            print(f"✗ {error}", file=sys.stderr)
            failures += 1
            continue
        for document in documents:
            body = document.body
            kind = body.get("kind") if isinstance(body, dict) else None
            try:
                if kind == SWEEP_KIND:
                    name = parse_sweep(body).metadata.name
                else:
                    name = parse_manifest(body).metadata.name
            except InvalidManifest as invalid:
                failures += 1
                count = len(invalid.problems)
                print(f"✗ {document.source}: {count} problem{'s' * (count != 1)}", file=sys.stderr)
                for problem in invalid.problems:
                    print(f"  {problem}".replace("\n", "\n  "), file=sys.stderr)
            else:
                print(f"✓ {document.source}: {kind} {name!r} is valid")
    return 1 if failures else 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from .docs import field_reference_markdown

    sys.stdout.write(field_reference_markdown(args.kind))
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from kubetune_trainer.quiet import silence_library_noise
    from kubetune_trainer.tiny import build_tiny_model, generate_quickstart_dataset

    silence_library_noise()
    model_dir = build_tiny_model(Path(args.directory))
    print(f"tiny model and tokenizer: {model_dir}")
    if args.data:
        data = Path(args.data)
        data.mkdir(parents=True, exist_ok=True)
        path = generate_quickstart_dataset(data / "train.jsonl", n=args.rows)
        print(f"instruction dataset: {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from kubetune_trainer.main import launch_local

    from .translate import trainer_config

    try:
        documents = read_documents(args.filename)
        if len(documents) != 1:
            raise ManifestFileError(
                f"{args.filename}: expected one FineTuneJob, found {len(documents)} documents"
            )
        job = parse_manifest(documents[0].body)
    except ManifestFileError as error:
        print(f"✗ {error}", file=sys.stderr)
        return 2
    except InvalidManifest as invalid:
        print(f"✗ {args.filename}: the job is not valid", file=sys.stderr)
        for problem in invalid.problems:
            print(f"  {problem}".replace("\n", "\n  "), file=sys.stderr)
        return 2
    if job.spec.resources.nodes > 1:
        print(
            f"✗ {args.filename}: spec.resources.nodes is {job.spec.resources.nodes}, but "
            "`kubetune train` runs on this machine only\n"
            "  hint: set spec.resources.nodes to 1 (several processes: "
            "spec.distributed.processesPerNode with gpus: 0, or gpus: N), or apply the job "
            "to a cluster",
            file=sys.stderr,
        )
        return 2
    output = str(Path(args.output).resolve()) if args.output else None
    return launch_local(trainer_config(job, output_uri=output), job.spec.world_size)


def _cmd_operator(args: argparse.Namespace) -> int:
    from .handlers import OperatorConfig
    from .runner import Operator, OperatorOptions

    options = OperatorOptions(
        config=OperatorConfig(
            image=args.image,
            progress_interval_seconds=args.progress_interval,
            resync_interval_seconds=args.resync_interval,
            progress_port=args.trainer_progress_port,
        ),
        kubeconfig=args.kubeconfig,
        namespaces=args.namespace or [],
        metrics_port=args.metrics_port,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    Operator(options).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune language models on Kubernetes."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crd = commands.add_parser("crd", help="print a CustomResourceDefinition")
    crd.add_argument(
        "--kind", choices=sorted(CRDS), default="FineTuneJob", help="default FineTuneJob"
    )
    crd.set_defaults(run=_cmd_crd)

    validate = commands.add_parser("validate", help="check FineTuneJob/FineTuneSweep manifests")
    validate.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="manifest file (YAML, may hold several documents; - for stdin)",
    )
    validate.set_defaults(run=_cmd_validate)

    docs = commands.add_parser("docs", help="print a field reference (Markdown)")
    docs.add_argument(
        "--kind", choices=sorted(CRDS), default="FineTuneJob", help="default FineTuneJob"
    )
    docs.set_defaults(run=_cmd_docs)

    tiny = commands.add_parser("tiny-model", help="build a tiny offline model for trying things")
    tiny.add_argument("directory", help="where to save the model and tokenizer")
    tiny.add_argument("--data", help="also write an instruction dataset into this directory")
    tiny.add_argument("--rows", type=int, default=400, help="rows in the dataset (default 400)")
    tiny.set_defaults(run=_cmd_tiny_model)

    train = commands.add_parser("train", help="run a FineTuneJob locally")
    train.add_argument("-f", "--filename", required=True, help="the FineTuneJob manifest")
    train.add_argument(
        "-o",
        "--output",
        help="output directory when the job names none (default ./kubetune-output/<name>)",
    )
    train.set_defaults(run=_cmd_train)

    from .workload import DEFAULT_IMAGE, PROGRESS_PORT

    operator = commands.add_parser("operator", help="run the FineTuneJob operator")
    operator.add_argument(
        "-n",
        "--namespace",
        action="append",
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    operator.add_argument("--image", default=DEFAULT_IMAGE, help="the trainer image")
    operator.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster)")
    operator.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics")
    operator.add_argument("--health-port", type=int, default=8081, help="liveness /healthz")
    operator.add_argument(
        "--progress-interval",
        type=float,
        default=5.0,
        help="seconds between polls of a running trainer's progress",
    )
    operator.add_argument(
        "--resync-interval", type=float, default=60.0, help="seconds between full reconciles"
    )
    operator.add_argument(
        "--trainer-progress-port",
        type=int,
        default=PROGRESS_PORT,
        help=f"port of the trainers' /progress endpoint (default {PROGRESS_PORT})",
    )
    operator.set_defaults(run=_cmd_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
