"""The ``kubetune`` command.

    kubetune crd                      print the FineTuneJob CRD (generated from the API models)
    kubetune crd --kind FineTuneSweep print the FineTuneSweep CRD (FineTunePolicy: its CRD)
    kubetune validate -f job.yaml     check manifests (FineTuneJobs, FineTuneSweeps,
                                      FineTunePolicies) as the operator will
    kubetune docs                     print the field reference (docs/reference.md)
    kubetune docs --kind FineTuneSweep  the sweep's field reference (docs/sweep-reference.md;
                                      FineTunePolicy: docs/policy-reference.md)
    kubetune tiny-model DIR           build a tiny offline model, tokenizer and dataset
    kubetune train -f job.yaml        run a FineTuneJob locally, no cluster needed
    kubetune plan -f job.yaml         data report and GPU memory estimate, before a GPU is spent
    kubetune sweep -f sweep.yaml      run a FineTuneSweep locally, one trial after another
    kubetune operator                 run the operator (in the cluster, or against a kubeconfig)

The trainer is imported only by the commands that train, so ``crd`` and ``validate``
work with the operator's dependencies alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .api.crd import CRDS, crd_yaml
from .api.policy import KIND as POLICY_KIND
from .api.policy import parse_policy
from .api.sweep import KIND as SWEEP_KIND
from .api.sweep import parse_sweep, spec_field, spec_value
from .api.types import API_VERSION, KIND
from .api.validation import InvalidManifest, Problem, parse_manifest
from .manifests import Document, ManifestFileError, read_documents, resolve_local_paths
from .reconcile import cluster_problems

T = TypeVar("T")


def _cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml(args.kind))
    return 0


# What ``kubetune validate`` checks, by kind.
_PARSERS: dict[str, Callable[[Any], Any]] = {
    KIND: parse_manifest,
    SWEEP_KIND: parse_sweep,
    POLICY_KIND: parse_policy,
}


def _print_problems(source: str, problems: list[Problem]) -> None:
    count = len(problems)
    print(f"✗ {source}: {count} problem{'s' * (count != 1)}", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}".replace("\n", "\n  "), file=sys.stderr)


def _check_gpu_memory(job: Any, body: dict[str, Any]) -> None:
    """What the operator checks before any pod: the model-architecture annotation parses,
    and the estimate fits spec.resources.gpuMemory (memory.py); InvalidManifest if not."""
    from .memory import ARCHITECTURE_ANNOTATION, memory_refusal

    annotations = (body.get("metadata") or {}).get("annotations") or {}
    try:
        refusal = memory_refusal(job, annotations)
    except (ValueError, TypeError) as error:
        field = f"metadata.annotations[{ARCHITECTURE_ANNOTATION}]"
        hint = "write it with kubetune plan -f FILE --annotate"
        raise InvalidManifest([Problem(field, str(error), hint)]) from None
    if refusal is not None:
        hint = "the operator refuses it (InsufficientGpuMemory); see docs/plan.md"
        raise InvalidManifest([Problem("spec.resources.gpuMemory", refusal, hint)])


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
            parse = _PARSERS.get(kind) if isinstance(kind, str) else None
            try:
                if parse is None and isinstance(body, dict):
                    raise InvalidManifest(
                        [
                            Problem(
                                "kind",
                                f"must be {' or '.join(_PARSERS)} (got {kind!r})",
                                "kubetune validate checks kubetune.io/v1alpha1 manifests; "
                                "check other kinds with kubectl apply --dry-run=server",
                            )
                        ]
                    )
                parsed = (parse or parse_manifest)(body)
                if kind == KIND:
                    _check_gpu_memory(parsed, body)
            except InvalidManifest as invalid:
                failures += 1
                _print_problems(document.source, invalid.problems)
            else:
                print(f"✓ {document.source}: {kind} {parsed.metadata.name!r} is valid")
                if kind == KIND:
                    # What the operator also needs on a cluster (kubetune train does not).
                    for problem in cluster_problems(parsed):
                        print(f"  note: {problem}".replace("\n", "\n  "))
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


def _read_one(filename: str, kind: str, parse: Callable[[Any], T]) -> tuple[T, Document] | None:
    """The one document of ``filename`` parsed as ``kind``, and the document; None after
    printing what is wrong (the field and the fix)."""
    try:
        documents = read_documents(filename)
        if len(documents) != 1:
            raise ManifestFileError(
                f"{filename}: expected one {kind}, found {len(documents)} documents; "
                "put each in its own file"
            )
        body = documents[0].body
        commands = {KIND: "kubetune train", SWEEP_KIND: "kubetune sweep"}
        if isinstance(body, dict) and body.get("kind") != kind and body.get("kind") in commands:
            raise ManifestFileError(
                f"{filename}: a {body['kind']}, not a {kind}; run it with "
                f"{commands[body['kind']]} -f {filename}"
            )
        return parse(body), documents[0]
    except ManifestFileError as error:
        print(f"✗ {error}", file=sys.stderr)
    except InvalidManifest as invalid:
        print(f"✗ {filename}: the {kind} is not valid", file=sys.stderr)
        for problem in invalid.problems:
            print(f"  {problem}".replace("\n", "\n  "), file=sys.stderr)
    return None


def _with_local_paths(
    filename: str, spec: dict[str, Any], directory: Path, at: str
) -> dict[str, Any] | None:
    """``spec`` with its relative local paths resolved against the manifest's directory;
    None after printing each path that is not there (and where it was looked for)."""
    resolved, problems = resolve_local_paths(spec, directory, at)
    if problems:
        _print_problems(filename, problems)
        return None
    return resolved


def _runs_here(filename: str, field: str, nodes: int, hint: str) -> bool:
    """Local commands run on this machine only: refuse several nodes, naming the field."""
    if nodes > 1:
        print(
            f"✗ {filename}: {field} is {nodes}, but this command runs on this machine only\n"
            f"  hint: {hint}",
            file=sys.stderr,
        )
    return nodes <= 1


def _cmd_train(args: argparse.Namespace) -> int:
    from kubetune_trainer.main import launch_local

    from .translate import trainer_config

    read = _read_one(args.filename, "FineTuneJob", parse_manifest)
    if read is None:
        return 2
    job, document = read
    if not _runs_here(
        args.filename,
        "spec.resources.nodes",
        job.spec.resources.nodes,
        "set spec.resources.nodes to 1 (several processes: spec.distributed.processesPerNode "
        "with gpus: 0, or gpus: N), or apply the job to a cluster",
    ):
        return 2
    spec = _with_local_paths(args.filename, document.body["spec"], document.directory, "spec")
    if spec is None:
        return 2
    job = parse_manifest({**document.body, "spec": spec})
    output = str(Path(args.output).resolve()) if args.output else None
    config = trainer_config(job, output_uri=output)
    if args.overwrite:  # the same choice as spec.output.overwrite: true
        config = config.model_copy(
            update={"output": config.output.model_copy(update={"overwrite": True})}
        )
    return launch_local(config, job.spec.world_size)


def _cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from .memory import ARCHITECTURE_ANNOTATION
    from .plan import PlanError, run_plan
    from .translate import trainer_config

    read = _read_one(args.filename, "FineTuneJob", parse_manifest)
    if read is None:
        return 2
    job, document = read
    spec = _with_local_paths(args.filename, document.body["spec"], document.directory, "spec")
    if spec is None:
        return 2
    job = parse_manifest({**document.body, "spec": spec})
    config = trainer_config(job, output_uri=str(Path(tempfile.gettempdir()) / "kubetune-plan"))
    try:
        code, report, lines = run_plan(
            job, config, gpu_memory=args.gpu_memory, with_data=not args.no_data
        )
    except (PlanError, ValueError, OSError) as error:
        print(f"✗ {args.filename}: {error}", file=sys.stderr)
        return 2
    text = sys.stderr if args.annotate or args.output == "json" else sys.stdout
    if args.output == "json":
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"plan for {job.metadata.name} ({args.filename})", file=text)
        for line in lines:
            print(line, file=text)
    if args.annotate:  # the manifest as written, plus what the operator checks it with
        body = copy.deepcopy(document.body)
        annotations = body.setdefault("metadata", {}).setdefault("annotations", {})
        annotations[ARCHITECTURE_ANNOTATION] = json.dumps(
            report["architecture"], sort_keys=True, separators=(",", ":")
        )
        sys.stdout.write(yaml.safe_dump(body, sort_keys=False))
    return code


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run a FineTuneSweep on this machine, one trial after another, with the operator's
    own sweep logic (reconcile_sweep): the same trials, names, parameters and best trial."""
    from .sweep import reconcile_sweep

    read = _read_one(args.filename, "FineTuneSweep", parse_sweep)
    if read is None:
        return 2
    sweep, document = read
    if not _runs_here(
        args.filename,
        "spec.template.resources.nodes",
        sweep.spec.template.resources.nodes,
        "set it to 1, or apply the sweep to a cluster",
    ):
        return 2
    spec = copy.deepcopy(document.body["spec"])
    template = _with_local_paths(
        args.filename, spec["template"], document.directory, "spec.template"
    )
    if template is None:
        return 2
    spec["template"] = template
    spec["parallelTrials"] = 1  # one trial after another
    if args.output:
        spec["template"]["output"] = {
            **spec["template"].get("output", {}),
            "uri": str(Path(args.output).resolve()),
        }
    name = sweep.metadata.name
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": SWEEP_KIND,
        "metadata": {"name": name, "generation": 1},
        "spec": spec,
    }
    metric = sweep.spec.objective.metric
    trials: list[dict[str, Any]] = []
    while True:
        decision = reconcile_sweep(body, trials, require_object_storage=False)
        body["status"] = decision.status
        for trial in trials:
            annotations = trial["metadata"].setdefault("annotations", {})
            annotations.update(decision.annotate_trials.get(trial["metadata"]["name"], {}))
        if decision.status.get("state") == "Invalid":
            print(f"✗ {args.filename}: {decision.status.get('message')}", file=sys.stderr)
            return 2
        if not decision.create_trials:
            break
        for manifest in decision.create_trials:
            trial = manifest["metadata"]["name"]
            values = ", ".join(f"{k}={v}" for k, v in _trial_parameters(manifest).items())
            print(f"\nkubetune: sweep {name}: trial {trial} ({values})", flush=True)
            manifest["status"] = _run_trial(manifest)
            trials.append(manifest)
            _print_sweep_table(body, trials, metric)
    status = decision.status
    best = status.get("bestTrial")
    print(
        f"\n{'✓' if status.get('state') == 'Succeeded' else '✗'} sweep {name}: "
        f"{status.get('message')}"
    )
    if best:
        print(f"  best trial   {best['name']}: {metric} {best['value']:.4f}")
        for path, value in best["parameters"].items():
            print(f"    {path} = {value}")
        if best.get("artifactUri"):
            print(f"  adapter      {best['artifactUri']}")
    return 0 if status.get("state") == "Succeeded" else 1


def _trial_parameters(manifest: dict[str, Any]) -> dict[str, str]:
    from .api.sweep import shown
    from .sweep import PARAMS_ANNOTATION

    params = json.loads(manifest["metadata"]["annotations"][PARAMS_ANNOTATION])
    fields = {path: spec_field(path) for path in params}
    return {path: shown(spec_value(fields[path], value)) for path, value in params.items()}


def _run_trial(manifest: dict[str, Any]) -> dict[str, Any]:
    """Train one trial locally; its FineTuneJob status, as the operator would write it."""
    from kubetune_trainer.main import TERMINATION_MESSAGE_ENV, launch_local
    from kubetune_trainer.storage import open_store

    from .translate import trainer_config

    job = parse_manifest(manifest)
    config = trainer_config(job)
    previous = os.environ.get(TERMINATION_MESSAGE_ENV)
    with tempfile.TemporaryDirectory(prefix="kubetune-sweep-") as scratch:
        termination = Path(scratch) / "termination-log"
        os.environ[TERMINATION_MESSAGE_ENV] = str(termination)
        try:
            code = launch_local(config, job.spec.world_size)
        finally:
            if previous is None:
                os.environ.pop(TERMINATION_MESSAGE_ENV, None)
            else:
                os.environ[TERMINATION_MESSAGE_ENV] = previous
        result: dict[str, Any] = {}
        if termination.is_file() and termination.read_text().strip():
            result = json.loads(termination.read_text())
    if code != 0:
        error = result.get("error") or {}
        return {"state": "Failed", "message": error.get("message") or f"exit code {code}"}
    if "metrics" not in result:
        # Several processes (torchrun) keep their own termination message: read the
        # artifact's manifest instead.
        store = open_store(config.output.uri, endpoint_url=config.output.endpoint_url)
        for folder in ("adapter", "model"):
            if store.exists(f"{folder}/manifest.json"):
                artifact = json.loads(store.get_bytes(f"{folder}/manifest.json"))
                result = {"metrics": artifact.get("metrics") or {}}
                result["artifact"] = {"uri": store.uri_for(folder)}
                break
    metrics = result.get("metrics") or {}
    status: dict[str, Any] = {
        "state": "Succeeded",
        "metrics": {
            target: metrics[source]
            for source, target in (
                ("train_loss", "trainLoss"),
                ("eval_loss", "evalLoss"),
                ("perplexity", "perplexity"),
            )
            if metrics.get(source) is not None
        },
    }
    if result.get("artifact"):
        status["artifact"] = result["artifact"]
    return status


def _print_sweep_table(body: dict[str, Any], trials: list[dict[str, Any]], metric: str) -> None:
    """The trials so far: parameters, state, objective; the best marked."""
    from .sweep import reconcile_sweep

    status = reconcile_sweep(body, trials, require_object_storage=False).status
    best = (status.get("bestTrial") or {}).get("name")
    rows = [("trial", "parameters", "state", metric)]
    for row in status.get("trials") or []:
        value = row.get("value")
        rows.append(
            (
                ("* " if row["name"] == best else "  ") + row["name"],
                ", ".join(f"{k}={v}" for k, v in row["parameters"].items()),
                row["state"],
                "" if value is None else f"{value:.4f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if best:
        print(f"best so far: {best}")


def _gpu_products(text: str | None) -> dict[str, str]:
    """--gpu-memory-by-product's JSON object: GPU product → memory quantity."""
    from .memory import parse_quantity

    table = json.loads(text) if text else {}
    if not isinstance(table, dict):
        raise ValueError('must be a JSON object such as {"NVIDIA-H100-80GB-HBM3": "80Gi"}')
    for memory in table.values():
        parse_quantity(memory if isinstance(memory, int) else str(memory))
    return {str(product): str(memory) for product, memory in table.items()}


def _cmd_operator(args: argparse.Namespace) -> int:
    from .handlers import OperatorConfig
    from .runner import Operator, OperatorOptions
    from .workload import NetworkPolicyConfig

    if args.ttl_seconds_after_finished is not None and args.ttl_seconds_after_finished < 0:
        print("error: --ttl-seconds-after-finished must be 0 or more", file=sys.stderr)
        return 2
    network_policy = None
    if args.job_network_policy:
        try:
            network_policy = NetworkPolicyConfig.from_json(
                args.job_network_policy, progress_port=args.trainer_progress_port
            )
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        gpu_products = _gpu_products(args.gpu_memory_by_product)
    except ValueError as error:
        print(f"error: --gpu-memory-by-product: {error}", file=sys.stderr)
        return 2
    options = OperatorOptions(
        config=OperatorConfig(
            image=args.image,
            progress_interval_seconds=args.progress_interval,
            resync_interval_seconds=args.resync_interval,
            progress_port=args.trainer_progress_port,
            ttl_seconds_after_finished=args.ttl_seconds_after_finished,
            network_policy=network_policy,
            model_cache_claim=args.model_cache_claim or None,
            trainer_uid=args.trainer_uid,
            gpu_products=gpu_products,
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
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an artifact at the output that other settings produced "
        "(as spec.output.overwrite: true)",
    )
    train.set_defaults(run=_cmd_train)

    plan = commands.add_parser(
        "plan",
        help="data report and GPU memory estimate of a FineTuneJob, before a GPU is spent",
    )
    plan.add_argument("-f", "--filename", required=True, help="the FineTuneJob manifest")
    plan.add_argument(
        "--gpu-memory",
        metavar="QUANTITY",
        help="memory of each GPU, such as 80Gi (default: spec.resources.gpuMemory)",
    )
    plan.add_argument(
        "--no-data", action="store_true", help="the memory estimate only (no data report)"
    )
    plan.add_argument(
        "--annotate",
        action="store_true",
        help="print the manifest with the kubetune.io/model-architecture annotation the "
        "operator checks spec.resources.gpuMemory with (the report goes to stderr)",
    )
    plan.add_argument("-o", "--output", choices=["text", "json"], default="text")
    plan.set_defaults(run=_cmd_plan)

    sweep = commands.add_parser("sweep", help="run a FineTuneSweep locally, trial by trial")
    sweep.add_argument("-f", "--filename", required=True, help="the FineTuneSweep manifest")
    sweep.add_argument(
        "-o",
        "--output",
        help="directory for the trials, instead of spec.template.output.uri "
        "(trial n writes under DIR/<sweep>-<n>/)",
    )
    sweep.set_defaults(run=_cmd_sweep)

    from .workload import DEFAULT_IMAGE, PROGRESS_PORT, TRAINER_UID

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
    operator.add_argument(
        "--ttl-seconds-after-finished",
        type=int,
        default=None,
        metavar="SECONDS",
        help="delete a finished job's Jobs, pods, Service and NetworkPolicies this long after "
        "it finished, unless its spec.ttlSecondsAfterFinished says otherwise "
        "(default: keep them)",
    )
    operator.add_argument(
        "--job-network-policy",
        metavar="JSON",
        help='a NetworkPolicy per attempt: {"operatorNamespace": NS, "operatorPodLabels": '
        '{...}, "egress": [rules] (optional; restricts egress to DNS, the attempt\'s pods and '
        "these)} (default: none)",
    )
    operator.add_argument(
        "--model-cache-claim",
        metavar="PVC",
        help="a ReadWriteMany PersistentVolumeClaim, in each job's namespace, that every "
        "attempt pod mounts as the shared model cache: each s3:// or hf:// base model is "
        "downloaded once (a FineTunePolicy's spec.modelCache.claimName overrides it; "
        "default: no cache)",
    )
    operator.add_argument(
        "--trainer-uid",
        type=_uid,
        default=TRAINER_UID,
        metavar="UID|platform",
        help=f"the UID (also group and fsGroup) trainer pods run as (default: {TRAINER_UID}, "
        "the trainer image's user); platform: set none and let the platform assign one, "
        "as OpenShift's restricted SCC requires",
    )
    operator.add_argument(
        "--gpu-memory-by-product",
        metavar="JSON",
        help="memory per GPU by the nodes' nvidia.com/gpu.product label, e.g. "
        '{"NVIDIA-H100-80GB-HBM3": "80Gi"}: a job whose nodeSelector names such a product '
        "is checked against it (as with spec.resources.gpuMemory) before its pods start",
    )
    operator.set_defaults(run=_cmd_operator)
    return parser


def _uid(value: str) -> int | None:
    """``--trainer-uid``: a UID of 1 or more, or "platform" (None: the platform assigns)."""
    if value == "platform":
        return None
    try:
        uid = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a UID or 'platform'") from None
    if uid < 1:
        raise argparse.ArgumentTypeError("the trainer must not run as root (UID 0)")
    return uid


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
