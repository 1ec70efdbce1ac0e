"""Dependencies go one way (library <- commands <- cli) and every module imports on its own (no import cycles)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "negmonitor"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved, ``from a import b`` as a.b)."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _layer(module: str) -> int:
    """0: library, 1: commands, 2: the cli (``negmonitor.cli`` and ``python -m negmonitor``)."""
    if module in ("negmonitor.cli", "negmonitor.__main__"):
        return 2
    return 1 if module == "negmonitor.commands" or module.startswith("negmonitor.commands.") else 0


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_walker_sees_relative_and_from_imports(tmp_path) -> None:
    """The checker itself catches the forms a violation can take."""
    sample = tmp_path / "sample.py"
    sample.write_text("from ..commands import common\nimport negmonitor.cli\nfrom negmonitor import cli\n")
    names = _imported(sample, "negmonitor.metrics.sample")
    assert {"negmonitor.commands.common", "negmonitor.cli"} <= names
    assert _layer("negmonitor.commands.common") == 1 and _layer("negmonitor.cli") == 2
    assert _layer("negmonitor.report.cli") == 0  # a library module, whatever its name


def test_dependencies_go_one_way() -> None:
    offences = []
    for path in _modules():
        module = _module_name(path)
        for name in _imported(path):
            if name.startswith("negmonitor") and _layer(name) > _layer(module):
                offences.append(f"{module} imports {name}")
    assert not offences, "library <- commands <- cli is broken:\n" + "\n".join(sorted(offences))


FRESH = textwrap.dedent('''
    import importlib, sys, traceback
    failures = []
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m == "negmonitor" or m.startswith("negmonitor.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
''')


def test_every_module_imports_fresh_on_its_own() -> None:
    """Each module imported first, in a process where no other negmonitor module is loaded: a cycle fails here."""
    names = [_module_name(p) for p in _modules() if p.name != "__main__.py"]  # importing it runs the CLI
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", FRESH, *names], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _module_edges(path: Path, module: str, modules: set[str]) -> set[str]:
    """negmonitor modules ``module`` imports anywhere in its file (inside functions too), ``from a import b``
    resolved to ``a.b`` where that is a module; a submodule taking names from its own package is left out (the
    package's ``__init__`` re-exporting its submodules is not a cycle)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.update([full] if full in modules else [base] if base in modules else [])
    return {m for m in out if m != module and not module.startswith(m + ".")}


def test_no_import_cycles_even_through_imports_inside_functions() -> None:
    """A deferred import inside a function still ties two modules together: no module may reach itself."""
    paths = {_module_name(p): p for p in _modules()}
    graph = {m: _module_edges(p, m, set(paths)) for m, p in paths.items()}
    cycles = []
    for start in graph:  # depth-first search from each module for a path back to it
        seen, todo = set(), [(start, [start])]
        while todo:
            node, trail = todo.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, trail + [nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:10])


def test_no_module_shares_its_name_with_something_its_package_exports() -> None:
    """``negmonitor.evaluation.perplexity`` was both a module and the package's function: ``import a.b as m`` then
    gave the function. Every submodule's name on its package is that module (or nothing)."""
    import importlib
    import types

    clashes = []
    for path in _modules():
        module = _module_name(path)
        package, _, name = module.rpartition(".")
        if not package or path.name == "__main__.py":
            continue
        importlib.import_module(module)
        found = getattr(sys.modules[package], name, None)
        if found is not None and not (isinstance(found, types.ModuleType) and found.__name__ == module):
            clashes.append(f"{module} (the package's {name!r} is {type(found).__name__})")
    assert not clashes, clashes
