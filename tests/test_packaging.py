"""The project's packaging: what the Dockerfile copies and calls exists; the CLI is installed."""
import re
import shutil
import subprocess
import sys
import tomllib


def test_dockerfile_copies_and_calls_what_exists(repo_dir):
    text = (repo_dir / "Dockerfile").read_text()
    copied = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert (repo_dir / src).exists(), f"Dockerfile copies {src}, which does not exist"
    cmd = re.search(r'^CMD \["python", "-m", "([\w.]+)"\]', text, re.M).group(1)
    assert (repo_dir / (cmd.replace(".", "/") + ".py")).exists()
    assert re.search(r"^FROM \S+cuda\S*", text, re.M), "the image must be a CUDA runtime image"


def test_pyproject_pins_the_stack(repo_dir):
    deps = tomllib.loads((repo_dir / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("fastapi<0.155") for d in deps)  # prefect 3.8's server crashes above
    assert any(d.startswith("torch>=") and "2.13" not in d for d in deps)  # a range: CPU and CUDA builds both fit


def test_console_script_is_installed():
    exe = shutil.which("ptuning") or str(__import__("pathlib").Path(sys.executable).parent / "ptuning")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "prepare" in out and "train" in out


def test_ci_runs_the_readme_test_command(repo_dir):
    readme = (repo_dir / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (repo_dir / ".ci" / "run").read_text()
