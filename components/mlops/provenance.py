"""Where a run's code and data came from, as tags for its MLflow run: the git commit of the checkout, and the data
version that dvc.lock records (the project's one reader of dvc.lock). Imports neither MLflow nor DVC."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def git_commit(directory: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git work tree around `directory` (cwd), or (None, None) outside one."""
    cwd = str(directory or Path.cwd())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def git_tags(directory: str | Path | None = None) -> dict:
    """The commit (MLflow's own source tag, and ours) and whether the work tree differs from it; {} outside git."""
    commit, dirty = git_commit(directory)
    if not commit:
        return {}
    return {"mlflow.source.git.commit": commit, "git_commit": commit, "git_dirty": str(dirty).lower()}


def _entry_hash(entry: dict) -> str | None:
    for key in ("md5", "etag", "checksum"):
        if entry.get(key):
            return str(entry[key])
    return None


def dvc_lock_tags(lock_path: str | Path, stages: list[str] | tuple[str, ...] | None = None) -> dict:
    """The data version as dvc.lock records it: tags `dvc.<stage>.outs.<path>` / `dvc.<stage>.deps.<path>` = md5,
    `dvc.lock_md5`, and `data_version`, one hash over the stage outputs (what the data is, whatever produced it).
    `stages`: only these (default all). No dvc.lock: {}. The tracker makes the keys names MLflow accepts."""
    import yaml

    if not Path(lock_path).is_file():
        return {}
    lock = yaml.safe_load(Path(lock_path).read_text()) or {}
    tags, outs = {}, []
    for stage, body in sorted((lock.get("stages") or {}).items()):
        if stages is not None and stage not in stages:
            continue
        for kind in ("deps", "outs"):
            for entry in (body or {}).get(kind) or []:
                digest = _entry_hash(entry)
                if digest and entry.get("path"):
                    tags[f"dvc.{stage}.{kind}.{entry['path']}"] = digest
                    if kind == "outs":
                        outs.append(f"{stage}:{entry['path']}:{digest}")
    tags["dvc.lock_md5"] = hashlib.md5(Path(lock_path).read_bytes()).hexdigest()
    if outs:
        tags["data_version"] = hashlib.md5("\n".join(sorted(outs)).encode()).hexdigest()[:12]
    return tags
