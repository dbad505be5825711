"""The layers of ARCHITECTURE.md hold: no library module imports a layer above its own, the library never
imports Prefect, and the code version that keys cached results covers every module a benchmark imports."""
import ast
from pathlib import Path

import pytest

import components
from components.run_config import code_modules, code_version, source_version

PACKAGE = Path(components.__file__).parent
# prefix -> layer (the longest prefix wins); a module may import its own layer and the ones below
LAYERS = {"components.common": 0, "components.config": 0,
          "components.method": 1, "components.training": 1, "components.models": 1, "components.data": 1,
          "components.benchmarks": 2, "components.mlops": 3,
          "components.run_config": 4, "components.run_dir": 4, "components.reports": 4, "components.cli": 5}


def layer(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer of ARCHITECTURE.md"
    return LAYERS[max(matches, key=len)]


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "components":
            yield name, ast.parse(path.read_text())


def imported(tree) -> set[str]:
    """Modules imported at run time (names under `if TYPE_CHECKING:` only annotate the protocol's signatures)."""
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.dump(block.test)
                 for n in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name, tree", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_no_module_reaches_up_a_layer(name, tree):
    own = layer(name)
    upward = sorted(m for m in imported(tree) if m.startswith("components.") and layer(m) > own)
    assert not upward, f"{name} (layer {own}) imports {upward} from above"
    assert not any(m.split(".")[0] == "prefect" for m in imported(tree)), f"{name} imports Prefect"


def test_code_version_follows_the_imports():
    """Every module the benchmark's code imports is hashed (the hand-kept list it replaced missed sources.py)."""
    lama = code_modules("lama")
    for needed in ("components.benchmarks.lama.run", "components.training.loop", "components.method.model",
                   "components.method.templates", "components.models.catalog", "components.data.sources"):
        assert needed in lama, needed
    assert not any(m.startswith(("components.mlops", "components.cli")) for m in lama)  # tracking changes no result
    assert code_version("lama") != code_version("superglue")


def test_code_version_follows_what_the_code_does_not_where_it_sits(tmp_path):
    """Comments, docstrings, imports, formatting and a definition moved to another module keep the code version
    (the committed tables stay current); a changed statement changes it."""
    (tmp_path / "one.py").write_text('"""Module."""\nimport os\n\n\ndef f(x):\n    """Doc."""\n    return x + 1  # why\n\n\n'
                                     'def g():\n    from os import path\n    return 2\n')
    (tmp_path / "moved.py").write_text("from a import b\n\ndef g():\n    return 2\n")
    (tmp_path / "rest.py").write_text("def f(x): return x + 1\n")
    (tmp_path / "changed.py").write_text("def f(x): return x + 2\n")
    same = source_version(tmp_path / "one.py")
    assert source_version(tmp_path / "rest.py", tmp_path / "moved.py") == same
    assert source_version(tmp_path / "changed.py", tmp_path / "moved.py") != same
