"""The code is one package, `launcher`, and its backends sub-package is a wing: imports run one way into it."""

import ast
import subprocess
import tomllib

from tests.conftest import ROOT


def _tracked_python() -> list[str]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if (ROOT / f).is_file()]


def _imports(path) -> set[str]:
    """Every module a file imports, at the top or inside a function (lazy imports are imports too)."""
    out = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from launcher import evaluate`
    return out


def _module(path: str) -> str:
    return path[:-3].replace("/", ".").removesuffix(".__init__")


def test_launcher_is_the_only_top_level_package_installed_or_imported():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert packages and all(p == "launcher" or p.startswith("launcher.") for p in packages)
    top_level = {f.split("/")[0] for f in _tracked_python() if "/" in f and f.endswith("/__init__.py")}
    assert top_level == {"launcher", "tests"}
    offenders = [(f, m) for f in _tracked_python() if f.startswith("launcher/") for m in _imports(f)
                 if m.split(".")[0] in {"backends", "tests"}]
    assert offenders == []


def test_nothing_the_backends_import_imports_the_backends_back():
    graph = {_module(f): {m for m in _imports(f) if m.startswith("launcher")}
             for f in _tracked_python() if f.startswith("launcher/")}
    wing = {m for m in graph if m == "launcher.backends" or m.startswith("launcher.backends.")}
    assert "launcher.backends.deepspeed" in wing
    reached, todo = set(), [i for m in wing for i in graph[m] if i not in wing]
    while todo:
        m = todo.pop()
        if m in reached or m not in graph or m in wing:
            continue
        reached.add(m)
        todo.extend(graph[m])
    back = sorted(m for m in reached if any(i in wing for i in graph[m]))
    assert back == [], f"imported by the backends and importing them back: {back}"
    assert "launcher.plan" in reached  # the walk did go somewhere
