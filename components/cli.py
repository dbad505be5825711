"""`ptuning`: the command-line face. DVC stages and the README call it; the flows call the same functions.

    ptuning prepare data|lama|fewglue     materialise and prepare the data (DVC stages)
    ptuning models prepare NAME            fetch/convert a catalogue model into the local cache
    ptuning train lama|superglue ...       train and evaluate one configuration, print its metrics as JSON

Exit codes: 0 done, 2 bad input (a one-line message, nothing written), 3 the output directory is busy,
4 the disk is full.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from components.benchmarks import REGISTRY, get_benchmark

# flag -> the parameter it sets (the same as --set KEY=VALUE)
TRAIN_FLAGS = {"task": "task", "model": "model", "method": "method", "steps": "train.max_steps",
               "eval_every": "train.eval_every", "lr": "train.lr", "seed": "train.seed"}


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
    output_dir = check_writable(args.output_dir or config.root / default_output_dir(config))
    metrics, reused = execute(config, output_dir, [LogProgress(every=args.log_every)], restart=args.restart)
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
        get_benchmark(name).add_cli_options(b)
        b.add_argument("--steps", type=int, help="maximum optimizer steps (train.max_steps)")
        b.add_argument("--eval-every", type=int, help="steps between evaluations (train.eval_every)")
        b.add_argument("--lr", type=float, help="prompt-encoder learning rate (train.lr)")
        b.add_argument("--seed", type=int, help="train.seed")
        b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any parameter of params/<benchmark>.yaml, e.g. train.batch_size=16 (values are YAML)")
        b.add_argument("--output-dir", help="default: outputs/<benchmark>/<task>/<model>/<method>")
        b.add_argument("--restart", action="store_true", help="discard a run of other settings in --output-dir")
        b.add_argument("--log-every", type=int, default=10)
        b.set_defaults(run=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    from components.run_dir import RunDirBusy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parser().parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: a clear message, no traceback
        print(f"ptuning: error: {error}", file=sys.stderr)
        return 2
    except RunDirBusy as error:
        print(f"ptuning: error: {error}", file=sys.stderr)
        return 3
    print(json.dumps(result, default=str))  # the last line: machine-readable figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
