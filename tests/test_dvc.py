"""DVC: the preparation and training stages of dvc.yaml, in a throw-away git repository that holds a copy of
the project's files (the working tree may be uncommitted) next to a link to the shared data mirror.

`dvc repro prepare_lama` works and a second run does nothing; a tiny `train_lama` (params/lama.yaml of the
copy set to tiny-gpt2 and a few steps) makes `dvc metrics show` and `dvc plots show` work; changing one
training parameter leaves only `train_lama` out of date; `dvc exp run -S` trains with the value it sets (the
stage reads the params/ of the workspace it runs in). In a fresh clone of the checkout, `dvc metrics show` prints
the reports' headline rows, short and without a warning, and `dvc plots show` leaves git's status clean."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

COPIED = ("components", "flows", "params", "dvc.yaml", ".dvcignore", ".dvc/config")


def _dvc(repo: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=240)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory, repo_dir, shared_dir):
    root = tmp_path_factory.mktemp("dvc")
    (root / "shared").symlink_to(shared_dir, target_is_directory=True)  # dvc.yaml's ../shared/...
    repo = root / "repo"
    repo.mkdir()
    for name in COPIED:
        source, target = repo_dir / name, repo / name
        if not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PTUNING_DATA_MIRROR": str(shared_dir / "data"),
           "PYTHONPATH": str(repo),  # `python -m flows.dvc_metrics` of the copy
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A tiny configuration of the training stage: tiny random GPT-2, one relation, 4 steps.
    lama = yaml.safe_load((repo / "params" / "lama.yaml").read_text())
    lama.update(task="P19", model="tiny-gpt2", method="ptuning", eval_batch_size=256)
    lama["train"].update(max_steps=4, eval_every=2, batch_size=8, epochs=1, patience=None)
    (repo / "params" / "lama.yaml").write_text(yaml.safe_dump(lama, sort_keys=False))
    return repo, env


def test_prepare_lama_runs_then_does_nothing(dvc_repo):
    repo, env = dvc_repo
    first = _dvc(repo, "repro", "prepare_lama", env=env)
    assert "Running stage 'prepare_lama'" in first.stdout, first.stdout[-2000:]
    assert (repo / "data" / "lama" / "29k" / "P19" / "test.jsonl").exists()
    second = _dvc(repo, "repro", "prepare_lama", env=env)
    assert "Running stage" not in second.stdout, second.stdout[-2000:]
    assert "didn't change" in second.stdout or "up to date" in second.stdout


def test_train_stage_metrics_plots_and_param_change(dvc_repo):
    repo, env = dvc_repo
    _dvc(repo, "repro", "train_lama", env=env)
    metrics_file = repo / "outputs" / "dvc" / "lama" / "metrics.json"
    curve = repo / "outputs" / "dvc" / "lama" / "learning_curve.csv"
    assert metrics_file.exists() and curve.exists()
    assert not list((repo / "outputs" / "dvc" / "lama" / "run").rglob("last.safetensors")), "the resume checkpoint is dropped"
    assert (repo / "outputs" / "dvc" / "lama" / "run" / "prompt").is_dir()
    lines = curve.read_text().splitlines()
    assert lines[0].split(",")[:3] == ["step", "epoch", "task"] and "dev_score" in lines[0]
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "2", "4"]  # the start, then every 2 steps

    # the stage's figures are an output shown by name (not a DVC metric: a fresh clone has none of them)
    shown = json.loads(_dvc(repo, "metrics", "show", "--json", "outputs/dvc/lama/metrics.json", env=env).stdout)
    text = json.dumps(shown)
    assert "outputs/dvc/lama/metrics.json" in text and '"p1"' in text and '"score"' in text
    assert set(shown[next(iter(shown))]["data"]["outputs/dvc/lama/metrics.json"]["data"]) >= {"test", "dev"}
    plots = _dvc(repo, "plots", "show", "--json", env=env)
    assert "learning_curve.csv" in plots.stdout and "dev_score" in plots.stdout
    html = _dvc(repo, "plots", "show", "-o", str(repo / "plots_html"), env=env)
    assert (repo / "plots_html" / "index.html").exists(), html.stdout

    # Up to date now; one changed training parameter puts train_lama, and nothing else, out of date.
    before = json.loads(_dvc(repo, "status", "--json", env=env).stdout or "{}")
    assert "train_lama" not in before and "prepare_lama" not in before and "materialise" not in before
    params_file = repo / "params" / "lama.yaml"
    lama = yaml.safe_load(params_file.read_text())
    lama["train"]["lr"] = 2.0e-5
    params_file.write_text(yaml.safe_dump(lama, sort_keys=False))
    after = json.loads(_dvc(repo, "status", "--json", env=env).stdout or "{}")
    assert set(after) - set(before) == {"train_lama"}, after
    assert "params/lama.yaml" in json.dumps(after["train_lama"])
    dry = _dvc(repo, "repro", "--dry", "train_lama", env=env)
    assert "Running stage 'train_lama'" in dry.stdout
    assert "Running stage 'prepare_lama'" not in dry.stdout and "Running stage 'materialise'" not in dry.stdout


def test_exp_run_set_param_reaches_the_training(dvc_repo):
    """`dvc exp run -S` writes the value into the workspace's params/lama.yaml (an exponent float included):
    the stage trains with it, read from that checkout."""
    repo, env = dvc_repo
    for args in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    _dvc(repo, "exp", "run", "-S", "params/lama.yaml:train.lr=3e-4", "train_lama", env=env)
    recorded = json.loads((repo / "outputs" / "dvc" / "lama" / "run" / "fingerprint.json").read_text())
    assert recorded["params"]["train"]["lr"] == 3e-4


def test_a_fresh_clone_shows_short_metrics_without_a_warning(repo_dir, tmp_path):
    """The checkout's files as git would commit them (tracked and untracked, not ignored), committed to a throw-away
    repository and cloned: `dvc metrics show` there prints the reports' headline figures (their metrics.json; the
    per-relation results.json is no DVC metric), fails to load nothing, and prints no line over 200 characters;
    `dvc plots show` writes dvc_plots/, which git ignores."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo_dir,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    source = tmp_path / "source"
    for name in filter(None, listed):
        if (repo_dir / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_dir / name, source / name)
    git = lambda cwd, *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                                             check=True, capture_output=True, text=True)
    git(source, "init", "-q")
    git(source, "add", "-A")
    git(source, "commit", "-qm", "checkout")
    git(tmp_path, "clone", "-q", str(source), "clone")
    clone = tmp_path / "clone"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    shown = _dvc(clone, "metrics", "show", env=env)
    assert "failed to load" not in shown.stdout + shown.stderr and not shown.stderr.strip(), shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    assert max(map(len, lines)) <= 200, max(lines, key=len)[:300]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {"reports/lama/smollm2-135m/metrics.json", "reports/superglue/smollm2-135m-fewshot/metrics.json"}
    assert lines[0].split()[0] == "Path" and {"ptuning", "manual", "majority"} <= set(lines[0].split())
    figures = json.loads(_dvc(clone, "metrics", "show", "--json", env=env).stdout)
    lama = next(iter(figures.values()))["data"]["reports/lama/smollm2-135m/metrics.json"]["data"]
    results = json.loads((clone / "reports" / "lama" / "smollm2-135m" / "results.json").read_text())
    assert lama["ptuning"] == results["methods"]["ptuning"]["macro_test_p1"]
    assert lama["majority"] == results["majority"]["macro_test_p1"]

    _dvc(clone, "plots", "show", env=env)
    assert (clone / "dvc_plots" / "index.html").exists()
    assert git(clone, "status", "--porcelain").stdout == ""
