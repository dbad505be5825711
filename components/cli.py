"""`ptuning`: the command-line face. DVC stages and the README call it; the flows call the same functions.

    ptuning prepare data|lama|fewglue     materialise and prepare the data (DVC stages)
    ptuning models prepare NAME            fetch/convert a catalogue model into the local cache
    ptuning train lama|superglue ...       train and evaluate one configuration, print its metrics as JSON
    ptuning report lama|superglue --model M ...   run a paper table and write reports/<benchmark>/<model>[-<setting>]/
    ptuning predict --model URI|DIR --input F.jsonl   answer inputs with a registered prompt or bank, one JSON line each
    ptuning bank register --report DIR     register a report's prompts as one bank (one LM serves them all)

Exit codes: 0 done, 2 bad input or a store that does not answer (a one-line message, nothing written), 3 the
output directory is busy, 4 the disk is full.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from components.benchmarks import REGISTRY, get_benchmark

# flag -> the parameter it sets (the same as --set KEY=VALUE)
TRAIN_FLAGS = {"task": "task", "model": "model", "method": "method", "steps": "train.max_steps",
               "eval_every": "train.eval_every", "lr": "train.lr", "seed": "train.seed", "preset": "preset"}
PRESET_HELP = "a named preset of params/<benchmark>.yaml's `presets:` (lama: paper, the paper code's defaults)"


def default_output_dir(config) -> Path:
    params = config.params
    return Path("outputs") / config.benchmark / str(params["task"]) / str(params["model"]).replace("/", "_") / params["method"]


def _train(args) -> dict:
    from components.config import parse_pairs
    from components.run_config import check_writable, resolve
    from components.run_dir import execute
    from components.training import LogProgress

    spec = get_benchmark(args.benchmark)
    overrides = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    overrides.update(spec.cli_overrides(args))
    overrides.update(parse_pairs(args.set))
    config = resolve(args.benchmark, overrides)
    callbacks = [LogProgress(every=args.log_every)]
    if args.init_from:
        from components.mlops.init_from import StartFromPrompt, check_source, resolve_source

        if len(config.tasks) != 1:
            raise ValueError(f"--init-from starts one prompt: give one --task, not {len(config.tasks)}")
        _check_model_store(args.init_from)
        source, directory = resolve_source(args.init_from)
        params = {**config.params, "task": config.tasks[0].task}  # the task's own name (SuperGLUE: lower case)
        callbacks.append(StartFromPrompt(directory, check_source(directory, args.benchmark, params)))
        config = replace(config, init_from=source)
    output_dir = check_writable(args.output_dir or config.root / default_output_dir(config))
    metrics, reused = execute(config, output_dir, callbacks, restart=args.restart)
    if reused:
        logging.getLogger("components").info("%s holds the finished run of these settings: read back", output_dir)
    return metrics


def _prepare(args) -> dict:
    from components.config import project_root

    root = project_root()
    if args.what == "data":
        from components.data.sources import main_materialise
        return main_materialise(args.mirror, args.out or "data/raw", from_upstream=args.from_upstream)
    name = {"lama": "lama", "fewglue": "superglue"}[args.what]
    out = Path(args.out or f"data/{args.what}")
    return get_benchmark(name).prepare(Path(args.raw), out, root)


def _models(args) -> dict:
    from components.models.catalog import model_dir
    return {"model": args.name, "path": str(model_dir(args.name))}


def _report(args) -> dict:
    from components.config import load_params, parse_pairs, project_root
    from components.reports import get_report

    root = project_root()
    kind = get_report(args.benchmark)
    settings = load_params("report", root)[args.benchmark]
    settings.update({k: getattr(args, k) for k in ("pool", "lm_batch") if getattr(args, k, None) is not None})
    report = kind.Report.from_settings(
        settings, args.model, "ptuning " + shlex.join(args.argv), root, option=getattr(args, kind.OPTION),
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None, tasks=args.tasks,
        methods=args.methods.split(",") if args.methods else None, output_dir=args.output_dir,
        params={**({"preset": args.preset} if args.preset else {}), **parse_pairs(args.set)})
    results = kind.run_report(report, settings, root, show_progress=not args.no_progress)
    return {"report": str(report.output_dir / "REPORT.md"), "wall_s": results["wall_s"], **kind.headline(results)}


def _check_model_store(model: str) -> None:
    """A `models:/` or `runs:/` URI is read from the registry (tracking) store: it must answer within the short
    reachability timeout (MLflow's own client retries an unreachable server or database for minutes) and, when it
    is a SQLite file, exist (reading would create an empty store). Raises StoreUnreachable or ValueError."""
    import mlflow

    from components.common import redact_url
    from components.mlops.stores import check_reachable

    if Path(model).expanduser().is_dir() or not model.startswith(("models:/", "runs:/")):
        return
    uri = mlflow.get_registry_uri() if model.startswith("models:/") else mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        import sqlalchemy

        database = sqlalchemy.engine.make_url(uri).database
        if database and database != ":memory:" and not Path(database).expanduser().is_file():
            raise ValueError(f"cannot load --model {model}: the MLflow store {redact_url(uri)} does not exist (set "
                             "MLFLOW_TRACKING_URI to the store the model was registered in)")
    check_reachable(uri)


def _predict(args) -> dict:
    """Answer every line of --input, without a server: one JSON line per input (stdout, or --output)."""
    from mlflow.exceptions import MlflowException

    from components.data.sources import read_jsonl
    from components.mlops.serving import load

    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input}: no such file")
    _check_model_store(args.model)
    try:
        fields, required, predict = load(args.model)
    except MlflowException as error:
        raise ValueError(f"cannot load --model {args.model}: {error.message.splitlines()[0]}") from None
    rows = read_jsonl(args.input, required=required)
    lines = [json.dumps({"input": {f: row[f] for f in fields if f in row}, **answer}) + "\n"
             for row, answer in zip(rows, predict(rows, top_k=args.top_k))]
    if args.output:
        Path(args.output).write_text("".join(lines))
    else:
        sys.stdout.writelines(lines)
    return {"model": args.model, "answered": len(lines), "output": args.output}


def _bank(args) -> dict:
    """Register a prompt bank of a report's P-tuning prompts (components/mlops/bank.py) in the tracking store."""
    import tempfile

    import mlflow

    from components.config import load_params, project_root
    from components.mlops.bank import bank_from_report, bank_name, log_bank_model, read_bank
    from components.mlops.stores import tracking_store
    from components.mlops.tracking import Tracker

    root = project_root()
    with tempfile.TemporaryDirectory() as tmp:
        bank_dir = bank_from_report(Path(args.report), Path(tmp) / "bank")  # refused before any store is touched
        bank = read_bank(bank_dir)
        name = args.name or bank_name(bank)
        tracker = Tracker(tracking_store({}, load_params("tracking", root), root), "ptuning-banks", project_dir=root)
        with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=name) as run:
            mlflow.log_params({"report": args.report, "n_prompts": len(bank["prompts"]), **{k: v for k, v in bank.items() if k != "prompts"}})
            _, version = log_bank_model(bank_dir, run_id=run.info.run_id, registered_model_name=name)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", "prompts": sorted(bank["prompts"])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptuning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="data preparation (DVC stages)")
    prep.add_argument("what", choices=("data", "lama", "fewglue"))
    prep.add_argument("--mirror", help="data mirror (default: params/data.yaml, env PTUNING_DATA_MIRROR)")
    prep.add_argument("--from-upstream", action="store_true", help="download from the upstream sources instead")
    prep.add_argument("--raw", default="data/raw")
    prep.add_argument("--out")
    prep.set_defaults(run=_prepare)

    models = sub.add_parser("models", help="model catalogue")
    models.add_argument("action", choices=("prepare",))
    models.add_argument("name")
    models.set_defaults(run=_models)

    train = sub.add_parser("train", help="train and evaluate one configuration")
    bench = train.add_subparsers(dest="benchmark", required=True)
    for name in REGISTRY:
        b = bench.add_parser(name, help=f"{name}: params/{name}.yaml")
        b.add_argument("--task", help="LAMA relation (P19, P19,P36, all) or SuperGLUE task (rte, cb, ...)")
        b.add_argument("--model")
        b.add_argument("--method")
        b.add_argument("--preset", help=PRESET_HELP)
        get_benchmark(name).add_cli_options(b)
        b.add_argument("--steps", type=int, help="maximum optimizer steps (train.max_steps)")
        b.add_argument("--eval-every", type=int, help="steps between evaluations (train.eval_every)")
        b.add_argument("--lr", type=float, help="prompt-encoder learning rate (train.lr)")
        b.add_argument("--seed", type=int, help="train.seed")
        b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any parameter of params/<benchmark>.yaml, e.g. train.batch_size=16 (values are YAML)")
        b.add_argument("--output-dir", help="default: outputs/<benchmark>/<task>/<model>/<method>")
        b.add_argument("--restart", action="store_true", help="discard whatever --output-dir holds and start fresh")
        b.add_argument("--init-from", metavar="SOURCE",
                       help="start from a learned prompt's encoder and train on: models:/NAME@champion, models:/NAME/3 "
                            "or a prompt directory (a frozen-LM prompt of this benchmark, task, base model and encoder "
                            "shape); the optimizer starts fresh")
        b.add_argument("--log-every", type=int, default=10)
        b.set_defaults(run=_train)

    report = sub.add_parser("report", help="run a benchmark's result table and write it up (params/report.yaml)")
    report_bench = report.add_subparsers(dest="benchmark", required=True)
    lama = report_bench.add_parser("lama", help="paper Table 2: reports/lama/<model>/ (resumes when run again)")
    lama.add_argument("--vocab", choices=("29k", "34k"))
    lama.add_argument("--relations", dest="tasks", help="comma list or all (default: params/report.yaml)")
    lama.add_argument("--pool", type=int, help="P-tuning prompts per shared batch (default: params/report.yaml)")
    lama.add_argument("--lm-batch", type=int, help="rows per LM forward (default: params/report.yaml)")
    superglue = report_bench.add_parser("superglue", help="paper Table 5: reports/superglue/<model>-<setting>/ (resumes)")
    superglue.add_argument("--setting", choices=("fewshot", "full"))
    superglue.add_argument("--tasks", help="comma list or all (default: params/report.yaml)")
    for b, (bench, methods) in {lama: ("lama", "manual, ptuning, finetune, manual-finetune"),
                                superglue: ("superglue", "finetune, manual-zeroshot, manual-finetune, ptuning")}.items():
        b.add_argument("--model", required=True)
        b.add_argument("--seeds", help="comma list, e.g. 34,35,36 (default: params/report.yaml)")
        b.add_argument("--methods", help=f"comma list of {methods}")
        b.add_argument("--preset", help=PRESET_HELP + "; the table goes to a folder of its own")
        b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a params/{bench}.yaml parameter for every method, e.g. train.max_steps=100")
        b.add_argument("--output-dir", help="default: reports/<benchmark>/<model>[-<setting>]")
        b.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
        b.set_defaults(run=_report)

    predict = sub.add_parser("predict", help="answer inputs with a registered prompt, without a server")
    predict.add_argument("--model", required=True, help="models:/NAME@champion (any MLflow model URI), a prompt or a bank directory")
    predict.add_argument("--input", required=True, help="JSONL, one object per line with the template's fields (LAMA: sub; a bank's rows add `task`)")
    predict.add_argument("--top-k", type=int, default=5, help="answers per input, best first")
    predict.add_argument("--output", help="write the answers (JSONL) here instead of stdout")
    predict.set_defaults(run=_predict)

    bank = sub.add_parser("bank", help="prompt banks: many frozen-LM prompts served by one LM")
    bank.add_argument("action", choices=("register",))
    bank.add_argument("--report", required=True, help="a LAMA report folder (reports/lama/<model>): per relation, "
                                                      "the P-tuning seed best on dev")
    bank.add_argument("--name", help="registered model name (default: ptuning-bank-<benchmark>-<vocab>-<model>)")
    bank.set_defaults(run=_bank)
    return p


def main(argv: list[str] | None = None) -> int:
    from components.mlops.stores import StoreUnreachable
    from components.run_dir import RunDirBusy
    from components.training import DiskFull

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv  # the exact command, for the record (a report's header)
    exit_codes = ((RunDirBusy, 3), (DiskFull, 4), (ValueError, 2), (FileNotFoundError, 2),  # first match wins
                  (StoreUnreachable, 2))
    try:
        result = args.run(args)
    except tuple(kind for kind, _ in exit_codes) as error:  # a clear message, no traceback
        print(f"ptuning: error: {error}", file=sys.stderr)
        return next(code for kind, code in exit_codes if isinstance(error, kind))
    print(json.dumps(result, default=str))  # the last line: machine-readable figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
