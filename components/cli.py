"""`ptuning`: the command-line face. DVC stages and the README call it; flows call the same functions.

    ptuning prepare data|lama|fewglue     materialise and prepare the data (DVC stages)
    ptuning models prepare NAME            fetch/convert a catalogue model into the local cache
    ptuning train lama|superglue ...       train and evaluate one configuration, print its metrics as JSON
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

BENCHMARKS = {"lama": "components.lama", "superglue": "components.superglue"}


def _train(args) -> dict:
    from components.params import apply_overrides, load_params
    from components.training import LogProgress

    overrides = {k: v for k, v in {"task": args.task, "model": args.model, "method": args.method}.items() if v is not None}
    if args.benchmark == "lama" and args.vocab:
        overrides["vocab"] = args.vocab
    if args.benchmark == "superglue" and args.setting:
        overrides["setting"] = args.setting
    for flag, key in (("steps", "train.max_steps"), ("seed", "train.seed"), ("lr", "train.lr"), ("eval_every", "train.eval_every")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    params = apply_overrides(load_params(args.benchmark, overrides), args.set)
    module = importlib.import_module(BENCHMARKS[args.benchmark])
    output_dir = Path(args.output_dir or Path("outputs") / args.benchmark / str(params["task"]) /
                      str(params["model"]).replace("/", "_") / params["method"])
    return module.run(params, output_dir, callbacks=[LogProgress(every=args.log_every)])


def _prepare(args) -> dict:
    if args.what == "data":
        from components.sources import main_materialise
        return main_materialise(args.mirror, args.out or "data/raw", from_upstream=args.from_upstream)
    if args.what == "lama":
        from components.lama_data import prepare
        return prepare(raw=args.raw, out=args.out or "data/lama", tokenizers=args.tokenizers)
    from components.superglue import prepare
    return prepare(raw=args.raw, out=args.out or "data/fewglue", seed=args.seed)


def _models(args) -> dict:
    from components.catalog import model_dir
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
    prep.add_argument("--tokenizers", help="directory with bert-base-cased/ and gpt2/ tokenizers")
    prep.add_argument("--seed", type=int, default=42, help="fewglue: seed of the dev32 sampling")
    prep.set_defaults(run=_prepare)

    models = sub.add_parser("models", help="model catalogue")
    models.add_argument("action", choices=("prepare",))
    models.add_argument("name")
    models.set_defaults(run=_models)

    train = sub.add_parser("train", help="train and evaluate one configuration")
    train.add_argument("benchmark", choices=sorted(BENCHMARKS))
    train.add_argument("--task", help="LAMA relation (P19, P19,P36, all) or SuperGLUE task (rte, cb, ...)")
    train.add_argument("--model")
    train.add_argument("--method")
    train.add_argument("--vocab", choices=("29k", "34k"), help="LAMA vocabulary")
    train.add_argument("--setting", choices=("fewshot", "full"), help="SuperGLUE setting")
    train.add_argument("--steps", type=int, help="maximum optimizer steps")
    train.add_argument("--eval-every", type=int, help="steps between evaluations (default: every epoch)")
    train.add_argument("--lr", type=float, help="prompt-encoder learning rate")
    train.add_argument("--seed", type=int)
    train.add_argument("--output-dir")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any parameter, e.g. train.batch_size=16")
    train.add_argument("--log-every", type=int, default=10)
    train.set_defaults(run=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parser().parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: a clear message, no traceback
        print(f"ptuning: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))  # the last line: machine-readable figures
    return 0


if __name__ == "__main__":
    sys.exit(main())
