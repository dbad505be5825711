#!/usr/bin/env python
"""The end-to-end check of a LAMA report's prompt bank, the way a user serves it: `ptuning bank register
--report` into a fresh MLflow store, `mlflow models serve` of that version, every test fact of every relation
sent over HTTP in mixed requests, and each relation's P@1 from the answers compared with the report's test P@1
of the seed the bank holds (results.json `test_p1_by_seed`), and so the macro average for that seed choice.
Prints one JSON line; exits 1 when a relation differs.

    python benchmarks/check_bank.py --report reports/lama/smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from components.benchmarks.lama.run import Candidates
from components.config import in_root, project_root
from components.data.sources import read_jsonl
from components.models.catalog import load_tokenizer

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_uri: str, env: dict, cwd: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` of the version, once it answers /ping: (process, invocations URL)."""
    port = free_port()
    log = open(cwd / "serve.log", "w")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-p", str(port), "-h", "127.0.0.1"], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {(cwd / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return server, f"http://127.0.0.1:{port}/invocations"
        except httpx.TransportError:
            pass
        time.sleep(1)
    server.terminate()
    raise TimeoutError("mlflow models serve did not answer /ping within 600 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", default="reports/lama/smollm2-135m")
    p.add_argument("--rows", type=int, default=256, help="rows per request (mixed relations)")
    args = p.parse_args(argv)
    root = project_root()
    report = in_root(Path(args.report), root)
    results = json.loads((report / "results.json").read_text())
    relations = results["methods"]["ptuning"]["relations"]
    params = results["provenance"]["ptuning"]["params"]
    data_dir = in_root(Path(params["data_dir"]), root)
    data = data_dir / params["vocab"]
    # the facts the table scored: those whose answer is one token of the model (P@1 ranks those words only)
    answers = set(Candidates.load({**params, "data_dir": str(data_dir)}, load_tokenizer(params["model"])).words)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_REGISTRY_URI"},  # the registry: this store
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
               "PTUNING_ROOT": str(root)}  # the commands run in the temporary folder
        done = subprocess.run([sys.executable, "-m", "components.cli", "bank", "register", "--report", str(report)],
                              env=env, cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr.strip().splitlines()[-1], file=sys.stderr)
            return 2
        registered = json.loads(done.stdout.strip().splitlines()[-1])
        from mlflow import MlflowClient

        tags = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version(registered["name"], registered["version"]).tags
        seeds = {r: source.split(f"/{r}-s")[1].split(" ")[0] for r, source in json.loads(tags["prompts"]).items()}
        facts = [(r, f) for r in sorted(seeds) for f in read_jsonl(data / r / "test.jsonl") if f["obj_label"] in answers]
        counts = Counter(r for r, _ in facts)
        other_facts = {r: (counts[r], relations[r]["n_test"]) for r in seeds if counts[r] != relations[r]["n_test"]}
        if other_facts:
            print(f"test facts (here, the table's) differ: {other_facts}", file=sys.stderr)
            return 2
        random.Random(0).shuffle(facts)  # requests mix the relations, as a bank's clients would
        server, url = serve(registered["uri"], env, tmp)
        try:
            t0, hits = time.time(), {r: [] for r in seeds}
            for i in range(0, len(facts), args.rows):
                chunk = facts[i:i + args.rows]
                answer = httpx.post(url, json={"inputs": [{"task": r, "sub": f["sub_label"]} for r, f in chunk],
                                               "params": {"top_k": 1}}, timeout=600)
                if answer.status_code != 200:
                    print(f"request {i // args.rows}: HTTP {answer.status_code} {answer.text[:300]}", file=sys.stderr)
                    return 1
                for (r, f), a in zip(chunk, answer.json()["predictions"]):
                    hits[r].append(a["prediction"] == f["obj_label"])
            seconds = time.time() - t0
        finally:
            server.terminate()
            server.wait(timeout=60)

    served = {r: sum(h) / len(h) for r, h in hits.items()}
    table = {r: relations[r]["test_p1_by_seed"][seeds[r]] for r in seeds}
    differ = {r: (served[r], table[r]) for r in seeds if abs(served[r] - table[r]) > 1e-9}
    print(json.dumps({"model": registered["uri"], "relations": len(seeds), "facts": len(facts),
                      "seconds": round(seconds, 1), "rows_per_second": round(len(facts) / seconds, 1),
                      "macro_p1_served": round(100 * sum(served.values()) / len(served), 2),
                      "macro_p1_report": round(100 * sum(table.values()) / len(table), 2),
                      "relations_that_differ": differ}))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
