"""The test suite's own rules (issue 26): a mark that is not registered fails instead of silently selecting
nothing, and no test module imports another (what they share is in tests/helpers/)."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

TESTS = Path(__file__).parent


def test_a_mistyped_mark_fails_the_run(repo_dir, tmp_path):
    config = tomllib.loads((repo_dir / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in config["addopts"]
    (tmp_path / "test_typo.py").write_text("import pytest\n\n\n@pytest.mark.slwo\ndef test_typo():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(repo_dir / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_typo.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and "'slwo' not found in `markers` configuration option" in done.stdout, done.stdout


def test_every_mark_the_tests_use_is_registered(repo_dir):
    config = tomllib.loads((repo_dir / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0].strip() for line in config["markers"]}
    builtin = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings", "timeout"}  # timeout: pytest-timeout
    used = set()
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            # pytest.mark.NAME, as a decorator, in pytestmark, or passed to add_marker
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark" \
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "pytest":
                used.add(node.attr)
    assert used - builtin and used - builtin <= registered, used - builtin - registered


def test_no_test_module_imports_another():
    """Neither in its imports nor in the scripts it runs in other processes (the search tests' workers)."""
    modules = {p.stem for p in TESTS.glob("test_*.py")}
    found = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", node.value, re.M)
            else:
                continue
            found += [(str(path.relative_to(TESTS)), n) for n in names if n.split(".")[0] in modules]
    assert found == []
