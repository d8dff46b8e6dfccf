"""The `loraforge` command line.

    loraforge run [CONFIG] [key=value ...]        run the whole pipeline (default config: flows/configs/demo.yaml)
    loraforge stage NAME [CONFIG] [key=value ...] run one stage on existing upstream artifacts
    loraforge show RUN|ARTIFACT [--store URL] [--json]
                                                  a run record (the table a run ends with) or an
                                                  artifact's lineage; --json: as JSON for scripts
    loraforge validate [CONFIG] [key=value ...]   check a config and print it resolved
    loraforge plan [CONFIG] [key=value ...] [--seq-len N | --from-data]
                                                  adapter parameters per module, adapter file size and
                                                  peak memory (LoRA, QLoRA 4/8-bit, full FT), no training
    loraforge sweep [CONFIG] --r 4,8,16 [--grid KEY=V1,V2 ...] [key=value ...]
                                                  train + evaluate each variant, one comparison table
    loraforge pull REPO[@REV] [REPO ...] --prompt TEXT [--gguf TYPE]
                                                  download published adapters (or a GGUF), verify them
                                                  against their lineage and answer the prompt with each
    loraforge import-config AXOLOTL.yaml > mine.yaml
                                                  an Axolotl config as a loraforge config; every key not
                                                  carried over is listed (stderr and the YAML's header)
    loraforge register-data FILE                  announce new training data to the Prefect server
                                                  (event loraforge.data.registered -> the pipeline deployment runs)

Exit codes: 0 success; 1 a user error (bad config, data or input artifact: one clear message, never a traceback);
2 a failed quality gate (nothing is published); 3 an internal error (one line naming a log file with the full
traceback); 130 interrupted (Ctrl-C or SIGTERM: the run stops, finished stages stay, a re-run resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from loraforge.tasks import registry
from loraforge.tasks.errors import ConfigError, GateFailed, LoraforgeError, StageError
from loraforge.tasks.process import cli_process

EXIT_USER, EXIT_GATE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
PROCESS_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loraforge` script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    previous_term = signal.signal(signal.SIGTERM, _interrupt)  # TERM unwinds like Ctrl-C: cleanup runs
    try:
        # Library deprecation chatter (transformers 5 renames) says nothing to a user running the pipeline.
        with cli_process(PROCESS_DEFAULTS, hide=(FutureWarning,)):
            return int(args.handler(args))
    except GateFailed as exc:
        print(f"loraforge: {exc}", file=sys.stderr)
        return EXIT_GATE
    except LoraforgeError as exc:
        print(f"loraforge: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("loraforge: interrupted; a re-run resumes (finished stages are cache hits)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `loraforge validate ... | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a loraforge bug or an environment failure: not the user's input
        log = _crash_log(exc)
        print(
            f"loraforge: internal error ({type(exc).__name__}: {str(exc)[:200]}); full traceback in {log}. "
            "This is not a problem with your input: please report it with that file.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _crash_log(exc: BaseException) -> Path:
    """Write the traceback of an unexpected error to a log file and return its path."""
    import tempfile
    import traceback

    folder = Path(os.environ.get("LORAFORGE_LOG_DIR") or Path.home() / ".cache" / "loraforge" / "logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"crash-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(exc)) + f"\nargv: {sys.argv}\n")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"loraforge {_version()}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the whole pipeline")
    run.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="a YAML config and/or overrides")
    run.set_defaults(handler=_run)
    stage = sub.add_parser("stage", help="run one stage on existing upstream artifacts")
    stage.add_argument("name", choices=registry.RUNNABLE)
    stage.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    stage.add_argument(
        "--input", dest="inputs", action="append", default=[], metavar="STAGE=KEY",
        help="an upstream artifact by key (repeatable; the base is resolved from base_model when not given): the "
        "stage runs on exactly these, directly on the store, without the Prefect flow (container entrypoints)",
    )  # fmt: skip
    stage.add_argument("--store", help="the artifact store (overrides `store` in the config)")
    stage.add_argument("--output", metavar="FILE", help="also write the result (stage, key, path, cached) as JSON")
    stage.set_defaults(handler=_stage)
    show = sub.add_parser("show", help="show a run record (id, prefix or 'latest') or an artifact's lineage")
    show.add_argument("ref", help="run id / 'latest' / stage/key / key prefix")
    show.add_argument("--store", default="./artifacts", help="artifact store (default ./artifacts)")
    show.add_argument("--json", action="store_true", help="the run record or the artifact's manifest as JSON")
    show.set_defaults(handler=_show)
    validate = sub.add_parser("validate", help="validate a config and print it resolved")
    validate.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    validate.set_defaults(handler=_validate)
    plan = sub.add_parser("plan", help="adapter parameters, adapter file size and peak memory, without training")
    plan.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    plan.add_argument("--seq-len", type=int, help="tokens per row to plan for (default: data.max_length)")
    plan.add_argument(
        "--from-data", action="store_true", help="plan for the longest train row (runs the data stage: usually cached)"
    )
    plan.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    plan.set_defaults(handler=_plan)
    sweep = sub.add_parser("sweep", help="train + evaluate one variant per value (e.g. --r 4,8,16), one table")
    sweep.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    sweep.add_argument("--r", help="LoRA ranks, comma-separated (same as --grid train.r=4,8,16)")
    sweep.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2",
        help="a config key and its values (repeatable: every combination is trained)",
    )  # fmt: skip
    sweep.add_argument("--json", type=Path, metavar="FILE", help="also write the table as JSON here")
    sweep.set_defaults(handler=_sweep)
    pull = sub.add_parser("pull", help="download, verify and try published adapters (or a GGUF)")
    pull.add_argument("repos", nargs="+", metavar="ORG/NAME[@REVISION]", help="one or more published repos")
    pull.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    pull.add_argument("--system", help="a system message before each prompt")
    pull.add_argument("--gguf", help="answer with this published GGUF type (e.g. q4_k_m) in llama-cpp-python")
    pull.add_argument("--base", help="base model to load the adapters on (default: the one in the lineage)")
    pull.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT, then huggingface.co)")
    pull.add_argument("--max-new-tokens", type=int, default=32)
    pull.set_defaults(handler=_pull)
    serve = sub.add_parser("serve", help="serve published adapters on one base: an OpenAI-compatible HTTP API")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=ORG/REPO[@REVISION]",
                       help="an adapter to serve under NAME (repeatable; `model` in a request picks it)")  # fmt: skip
    serve.add_argument("--base", help="the base model (default: the one the first adapter was trained on)")
    serve.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT, then huggingface.co)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch", type=int, default=8, help="most requests answered in one batch (default 8)")
    serve.add_argument("--gguf", choices=["f16"], help="serve with llama.cpp: the base as an f16 GGUF (converted once, "
                       "cached), each adapter's published GGUF LoRA applied per request")  # fmt: skip
    serve.set_defaults(handler=_serve)
    imported = sub.add_parser("import-config", help="convert an Axolotl config to a loraforge config (stdout)")
    imported.add_argument("file", metavar="AXOLOTL.yaml", help="the Axolotl config to convert (docs/axolotl.md)")
    imported.set_defaults(handler=_import_config)
    register = sub.add_parser("register-data", help="emit loraforge.data.registered for a new training file")
    register.add_argument("file", help="the training data file (.jsonl, .json, .csv, .parquet)")
    register.set_defaults(handler=_register_data)
    return parser


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _register_data(args: argparse.Namespace) -> int:
    """Emit `loraforge.data.registered` (resource `loraforge.data.<sha256 prefix>`, payload path/sha256/size).

    The pipeline deployment's trigger (infra/prefect.yaml) turns it into a run with `data_file` = the path, so
    the path must be one the workers can read (the shared volume).
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    from loraforge.tasks.artifacts import sha256_file

    path = Path(args.file).expanduser().resolve()
    if not path.is_file() or path.suffix not in DATA_SUFFIXES:
        what = "does not exist" if not path.exists() else f"is not a {'/'.join(DATA_SUFFIXES)} file"
        raise LoraforgeError(f"register-data: {args.file} {what}; give the training data file to run the pipeline on.")
    if not PREFECT_API_URL.value():
        raise LoraforgeError(
            "register-data: the event goes to a Prefect server; set PREFECT_API_URL (`make stack` prints it)."
        )
    digest = sha256_file(path)
    event = emit_event(
        event="loraforge.data.registered",
        resource={"prefect.resource.id": f"loraforge.data.{digest[:16]}", "prefect.resource.name": path.name},
        payload={"path": str(path), "sha256": digest, "size": path.stat().st_size},
    )
    EventsWorker.drain_all(timeout=60)
    if event is None:
        raise LoraforgeError(f"register-data: Prefect did not emit the event (is {PREFECT_API_URL.value()} reachable?)")
    print(f"registered {path} (sha256 {digest[:16]}): event {event.id}")
    return 0


def _import_config(args: argparse.Namespace) -> int:
    """The loraforge YAML on stdout; what was not carried over (or changed meaning) also on stderr."""
    from loraforge.flows.import_config import import_axolotl

    imported = import_axolotl(args.file)
    sys.stdout.write(imported.to_yaml(args.file))
    for title, notes in (("not carried over", imported.dropped), ("changed meaning", imported.changed)):
        for note in imported.notes(notes):
            print(f"import-config: {title}: {note}", file=sys.stderr)
    print(f"import-config: {len(imported.dropped)} keys not carried over, {len(imported.changed)} with a changed "
          "meaning (listed at the top of the output too)", file=sys.stderr)  # fmt: skip
    return 0


def _pull(args: argparse.Namespace) -> int:
    from loraforge.tasks.pull import pull

    pulled = pull(args.repos, args.prompt, gguf=args.gguf, base_model=args.base, endpoint=args.endpoint,
                  max_new_tokens=args.max_new_tokens, system=args.system)  # fmt: skip
    for item in pulled:
        print(f"== {item.repo_id}@{item.commit[:12]} ({'gguf ' + args.gguf if args.gguf else 'adapter'})")
        for prompt, answer in zip(args.prompt, item.answers, strict=True):
            print(f"> {prompt}\n{answer}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from loraforge.tasks.serve import create_app, open_library

    specs, problems = {}, []
    for item in args.adapter:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            problems.append(f"--adapter {item!r}: write NAME=ORG/REPO[@REVISION], e.g. router=acme/router-lora@v1")
        elif name in specs:
            problems.append(f"--adapter {item!r}: the name {name!r} is given twice")
        specs[name] = spec
    if args.max_batch < 1:
        problems.append(f"--max-batch {args.max_batch}: give 1 or more")
    if problems:
        raise LoraforgeError("serve: " + "; ".join(problems))
    import uvicorn

    library = open_library(specs, args.base, args.endpoint, args.max_batch, gguf=bool(args.gguf))
    token = os.environ.get("LORAFORGE_ADMIN_TOKEN") or None
    print(f"[serve] {len(library.adapters)} adapter(s) on {library.base_path}; http://{args.host}:{args.port}/v1 "
          f"(adapter management {'on' if token else 'off: set LORAFORGE_ADMIN_TOKEN'})")  # fmt: skip
    uvicorn.run(create_app(library, token), host=args.host, port=args.port, log_level="warning")
    return 0


def _load(items: list[str]) -> Any:
    from loraforge.tasks.config import load_config

    paths = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if len(paths) > 1:
        raise LoraforgeError(f"give one config file, got {len(paths)}: {', '.join(paths)}")
    return load_config(paths[0] if paths else None, overrides)


def _plan(args: argparse.Namespace) -> int:
    from loraforge.tasks.plan import data_logit_positions, data_seq_len, format_plan, plan_training

    config = _load(args.items)
    seq_len, source, positions = args.seq_len, None, None
    if args.from_data:
        seq_len, source = data_seq_len(config)
        positions = data_logit_positions(config)
    result = plan_training(config, seq_len=seq_len, seq_len_source=source, logit_positions=positions)
    print(format_plan(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
        print(f"plan written to {args.json}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from loraforge.flows.sweep import grid_points, sweep

    grid: dict[str, list[str]] = {}
    for item in ([f"train.r={args.r}"] if args.r else []) + args.grid:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise LoraforgeError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. --grid train.r=4,8,16")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    if not grid:
        raise LoraforgeError("sweep: nothing to sweep; give --r 4,8,16 or --grid KEY=V1,V2")
    # Values with commas inside (lists) cannot be written in --grid; each variant is validated like a run's config.
    variants = [(point, _load([*args.items, *(f"{k}={v}" for k, v in point.items())])) for point in grid_points(grid)]
    _quiet_user_errors()
    record = sweep(variants)
    from loraforge.flows.sweep import to_markdown

    print(to_markdown(record["rows"]))
    print(f"sweep table: {record['json']} and {record['markdown']}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Check the config, then what can be checked before a run without downloads: the store can be written, a
    local base model folder is whole, and train.target_modules names layers of its architecture."""
    from loraforge.tasks.artifacts import ArtifactStore

    config = _load(args.items)
    failures: list[LoraforgeError] = []
    for check in (ArtifactStore(config.store, config.store_verify).check_writable, lambda: _check_base(config)):
        try:
            check()
        except LoraforgeError as exc:
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise ConfigError(f"{len(failures)} problems:\n  - " + "\n  - ".join(str(f) for f in failures))
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


def _check_base(config: Any) -> None:
    import re

    from loraforge.tasks.hubclient import REPO_ID, REPO_ID_RULE
    from loraforge.tasks.models import local_base_folder

    folder = local_base_folder(config.base_model)
    if folder is None and ":" not in config.base_model and not re.fullmatch(REPO_ID + r"(@\S+)?", config.base_model):
        where = Path(config.base_model).expanduser().resolve()
        raise StageError(
            f"base_model: {config.base_model!r} is neither a local folder (none at {where}) nor a Hub repo id "
            f"({REPO_ID_RULE}, e.g. HuggingFaceTB/SmolLM2-135M-Instruct[@revision])."
        )
    if folder is not None:
        from loraforge.tasks.train import check_target_modules

        check_target_modules(config.train.target_modules, folder)


def _run(args: argparse.Namespace) -> int:
    config = _load(args.items)
    _quiet_user_errors()
    from loraforge.flows.pipeline import pipeline
    from loraforge.tasks.artifacts import ArtifactStore

    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:12]
    failure: LoraforgeError | None = None
    try:
        record = pipeline(config, only=getattr(args, "name", None), run_id=run_id)
    except LoraforgeError as exc:
        failure = exc
        try:
            record = ArtifactStore(config.store, config.store_verify).load_run(run_id)  # what ran before
        except (LoraforgeError, OSError, ValueError):  # no record (the store itself failed): the error says why
            record = {}
    _print_record({"name": config.name, **record}, time.perf_counter() - started, failure)
    if failure is not None:
        raise failure
    return 0


def _stage(args: argparse.Namespace) -> int:
    """`loraforge stage`: through the flow on the config's upstream artifacts, or (--input) on given keys."""
    items = [*args.items, *([f"store={args.store}"] if args.store else [])]
    if not args.inputs:
        if args.output:
            raise LoraforgeError("--output goes with --input (a stage run on given upstream keys)")
        return _run(argparse.Namespace(**{**vars(args), "items": items}))
    config = _load(items)
    stage = registry.stage(args.name)
    artifact = _stage_from_keys(config, stage, args.inputs)
    result = {"stage": artifact.stage, "key": artifact.key, "path": str(artifact.path), "cached": artifact.cached}
    if args.output:
        Path(args.output).write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    stage.verify(artifact)  # written either way, as in the pipeline; a failed eval gate exits 2
    return 0


def _stage_from_keys(config: Any, stage: registry.Stage, given: list[str]) -> Any:
    """Run one stage on the upstream artifacts named by key (`STAGE=KEY`); only that stage may write to the store.

    The base is provisioned from `base_model` (the model cache must be reachable: in a container, a volume)
    and, when its key is given too, checked against it; the publish stage only reads the base's manifest.
    """
    from loraforge.flows.stages import input_problems, upstream
    from loraforge.tasks.artifacts import ArtifactStore

    keys: dict[str, str] = {}
    problems = []
    for item in given:
        name, sep, key = item.partition("=")
        if not sep or not key:
            problems.append(f"--input {item!r}: expected STAGE=KEY, e.g. --input data=<key of the data artifact>")
        else:
            keys[name] = key
    problems += input_problems(stage, keys, "--input ", base_optional=True)  # the base: provisioned below
    if problems:
        raise LoraforgeError("; ".join(problems))
    store = ArtifactStore(config.store, config.store_verify)
    store.check_writable()  # a store under /proc or read-only: said before anything is looked up or provisioned
    if "base" in stage.inputs and "base" not in keys and not stage.weights:
        keys["base"] = _provisioned_base_key(config, store)
    artifacts = upstream(stage, config, store, keys, option="--input ")
    return stage.run(config, artifacts, store.restricted_to(stage.name))


def _provisioned_base_key(config: Any, store: Any) -> str:
    """The key of base_model provisioned here (for a stage that reads only the base manifest, given no key)."""
    from loraforge.tasks.models import provision_base

    return str(provision_base(config.base_model, store).key)


def _show(args: argparse.Namespace) -> int:
    from loraforge.tasks.artifacts import ArtifactStore

    store = ArtifactStore(args.store)
    if store.has_run(args.ref):
        record = store.load_run(args.ref)
        if args.json:
            print(json.dumps(record, indent=2))
        else:
            _print_record(record, seconds=None, failure=None)
        return 0
    artifact = store.lookup(args.ref)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
    else:
        _print_lineage(store, artifact.stage, artifact.key, depth=0)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraforge")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _print_lineage(store: Any, stage: str, key: str, depth: int) -> None:
    artifact = store.get(stage, key)
    m = artifact.manifest
    pad = "  " * depth
    metrics = ", ".join(f"{k}={v}" for k, v in list(m.get("metrics", {}).items())[:6])
    print(f"{pad}{stage}/{key}  created {m.get('created_at')}  code {m.get('code_version')}  {artifact.path}")
    if metrics:
        print(f"{pad}  metrics: {metrics}")
    for name, ref in m.get("inputs", {}).items():
        print(f"{pad}  <- {name}:")
        _print_lineage(store, ref["stage"], ref["key"], depth + 2)


def _print_record(record: dict[str, Any], seconds: float | None, failure: Exception | None) -> None:
    """A run record, readable: what a run prints at its end and `loraforge show RUN` prints (without the total)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, width=max(100, Console().width))
    table = Table(title=f"loraforge run {record.get('run_id', '?')} ({record.get('name', '?')})")
    for column in ("stage", "status", "key", "seconds"):
        table.add_column(column)
    for stage, info in record.get("stages", {}).items():
        status = {True: "cache hit", False: "ran"}.get(info.get("cached"), "?")
        table.add_row(stage, status, info["key"], str(info.get("seconds", "?")))
    console.print(table)
    if "store" in record:
        console.print(f"artifacts: {record['store'].removeprefix('file://')}/<stage>/<key>/")
    if "eval" in record:
        ev = record["eval"]
        console.print("eval (test split): " + ", ".join(
            f"{m} base {ev.get('base_' + m, float('nan')):.3f} -> tuned {ev[m]:.3f}"
            for m in ("accuracy", "macro_f1", "rouge_l", "entity_f1", "perplexity") if m in ev))  # fmt: skip
    if "gate" in record:
        from loraforge.tasks.evaluate import Gate

        gate = Gate(**record["gate"])  # the run record holds read_gate's fields
        console.print(f"gate: {'PASSED' if gate.passed else 'FAILED'} ({gate.summary()})")
    from loraforge.tasks.quantize import probe_summary

    for qtype, info in record.get("gguf", {}).items():
        verdict = "passed" if info.get("passed", True) else f"[red]withheld[/red]: {info.get('reason')}"
        console.print(f"gguf {qtype}: {info['file']} {info['size_mb']} MB, KL {info.get('mean_kl', float('nan')):.4f}, "
                      f"top-1 {info.get('top1_agreement', float('nan')):.3f}, {probe_summary(info)}, "
                      f"answer {info['sample_answer']!r}; {verdict}")  # fmt: skip
    if "publish" in record:
        pub = record["publish"]
        where = f"{pub['endpoint']}/{pub['repo_id']}@{pub['tag']}"
        console.print(
            f"publish: {'pushed to ' + where if pub['mode'] == 'push' else 'bundle only (no Hub token) for ' + where}"
        )
    if "run_id" in record and "store" in record:
        where = f"{record['store'].removeprefix('file://')}/runs/{record['run_id']}.json"
        console.print(f"total {seconds:.0f} s; run record {where}" if seconds is not None else f"run record {where}")
    if failure is not None:  # the message itself is printed once, last (`main`)
        console.print(f"[red]failed[/red] ({type(failure).__name__}): the message follows")


class _DropUserErrorTracebacks(logging.Filter):
    """Prefect logs task/flow exceptions with tracebacks; for loraforge's own user errors the message suffices."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], LoraforgeError):
            record.exc_info = None
            record.exc_text = None
        return True


def _error_names(cls: type[BaseException] = LoraforgeError) -> set[str]:
    return {cls.__name__}.union(*(_error_names(sub) for sub in cls.__subclasses__()))


class _OneUserErrorMessage(logging.Filter):
    """On the console, Prefect repeats a failed task's exception in four lines (task failed, task state, flow
    failed, flow state); the CLI prints a loraforge error once at the end, so those lines keep only its class.
    Only console handlers get this filter (it runs after the API handler sent the full line to the server)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        found = [text.find(n) for n in _error_names() if f"{n}(" in text or f"{n}: " in text]
        if found:
            at = min(i for i in found if i >= 0)
            name = text[at:].split("(")[0].split(":")[0]
            record.msg, record.args = f"{text[:at]}{name} (the message is printed at the end)", None
        return True


def _quiet_user_errors() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    names = ["", *[n for n in logging.root.manager.loggerDict if n.startswith("prefect")]]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_DropUserErrorTracebacks())
            if isinstance(handler, logging.StreamHandler):
                handler.addFilter(_OneUserErrorMessage())


if __name__ == "__main__":
    sys.exit(main())
