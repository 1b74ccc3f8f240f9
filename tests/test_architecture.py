"""The import rules of docs/architecture.md, read from the source with ``ast`` (nothing is
imported): imports go downward only (demos / cli / report -> callbacks -> capture / core).

Every import statement counts, also one inside a function (a lazy import is still a dependency).
A failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
import os
from functools import cache
from typing import Dict, List, Tuple

import pytest

import lightning_memo

PKG = "lightning_memo"
ROOT = os.path.dirname(os.path.abspath(lightning_memo.__file__))

#: the math core: torch (and numpy) only, usable in a notebook without a Trainer
CORE = ("psmi", "leace", "probe", "signals", "influence")
#: what the math core must not import: Lightning, the batch-format accessors, the upper layers
CORE_FORBIDDEN = (
    "lightning",
    "pytorch_lightning",
    f"{PKG}.data",
    f"{PKG}.callbacks",
    f"{PKG}.demos",
    f"{PKG}.cli",
    f"{PKG}.report",
)
#: what capture.py must not import: it knows modules, hooks and indices, no estimator
CAPTURE_FORBIDDEN = (f"{PKG}.psmi", f"{PKG}.leace", f"{PKG}.influence", f"{PKG}.callbacks")


def _module_name(rel_path: str) -> str:
    """``callbacks/tracin.py`` -> ``lightning_memo.callbacks.tracin`` (a package: its name)."""
    parts = rel_path[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


@cache
def modules() -> Dict[str, str]:
    """``{module name: path relative to the package}`` of every module of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                out[_module_name(rel)] = rel
    return out


@cache
def tree(rel_path: str) -> ast.Module:
    with open(os.path.join(ROOT, rel_path), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=rel_path)


@cache
def imports(rel_path: str) -> Tuple[Tuple[int, str], ...]:
    """``(line, absolute module name)`` of every import in the file; ``from x import y`` gives
    ``x.y`` when ``x.y`` is a module of the package (``from . import demos``), else ``x``."""
    name = _module_name(rel_path)
    package = name if rel_path.endswith("__init__.py") else name.rpartition(".")[0]
    found: List[Tuple[int, str]] = []
    for node in ast.walk(tree(rel_path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.append((node.lineno, sub if sub in modules() else mod))
    return tuple(found)


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(rel_paths, forbidden) -> List[str]:
    found = {
        f"{PKG}/{rel}:{line} imports {mod}"
        for rel in rel_paths
        for line, mod in imports(rel)
        if any(_is_under(mod, f) for f in forbidden)
    }
    return sorted(found)


def _files_of(*prefixes: str) -> List[str]:
    return sorted(
        rel for name, rel in modules().items() if any(_is_under(name, p) for p in prefixes)
    )


def _fail_if(problems: List[str], rule: str) -> None:
    if problems:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(problems), pytrace=False)


def test_the_package_is_found():
    names = modules()
    assert f"{PKG}.psmi" in names and f"{PKG}.influence.methods.base" in names
    assert f"{PKG}.callbacks.common" in names and f"{PKG}.cli" in names
    # relative imports resolve to module names (from ..capture import x; from .common import y)
    found = {mod for _, mod in imports(os.path.join("callbacks", "tracin.py"))}
    assert {f"{PKG}.capture", f"{PKG}.callbacks.common", "lightning.pytorch"} <= found
    found = {mod for _, mod in imports(os.path.join("influence", "methods", "boundary.py"))}
    assert {f"{PKG}.capture", f"{PKG}.influence.deepfool", f"{PKG}.influence.methods.base"} <= found
    # relative imports resolve to module names (from ..capture import x; from .common import y)
    found = {mod for _, mod in imports(os.path.join("callbacks", "tracin.py"))}
    assert {f"{PKG}.capture", f"{PKG}.callbacks.common", "lightning.pytorch"} <= found
    found = {mod for _, mod in imports(os.path.join("influence", "methods", "boundary.py"))}
    assert {f"{PKG}.capture", f"{PKG}.influence.deepfool", f"{PKG}.influence.methods.base"} <= found


def test_math_core_imports_no_lightning_and_no_upper_layer():
    files = _files_of(*(f"{PKG}.{m}" for m in CORE))
    assert len(files) > 10
    _fail_if(
        _violations(files, CORE_FORBIDDEN),
        "the math core (psmi, leace, probe, signals, influence/) imports only torch and the "
        "lower layers, never Lightning, data.py's batch formats, callbacks, demos, cli or report",
    )


def test_capture_imports_no_estimator_and_no_callback():
    _fail_if(
        _violations(["capture.py"], CAPTURE_FORBIDDEN),
        "capture.py knows modules, hooks and sample indices; it imports no psmi, leace, "
        "influence or callbacks",
    )


def _defines_callback(rel_path: str) -> bool:
    """Whether the module defines a class deriving from ``Callback`` (by its base's name)."""
    for node in ast.walk(tree(rel_path)):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name == "Callback":
                    return True
    return False


def test_callbacks_never_import_each_other():
    """A module of callbacks/ imports no callback module (one that defines a Callback); shared
    code lives in callbacks/common.py and callbacks/reports.py. Only callbacks/__init__.py
    gathers the callbacks."""
    files = [f for f in _files_of(f"{PKG}.callbacks") if not f.endswith("__init__.py")]
    callback_modules = {_module_name(f) for f in files if _defines_callback(f)}
    assert {f"{PKG}.callbacks.tracin", f"{PKG}.callbacks.memorization"} <= callback_modules
    for shared in ("common", "reports"):
        assert f"{PKG}.callbacks.{shared}" not in callback_modules
    problems = []
    for rel in files:
        for line, mod in imports(rel):
            if mod in callback_modules and mod != _module_name(rel):
                problems.append(f"{PKG}/{rel}:{line} imports {mod}")
            elif mod == f"{PKG}.callbacks":
                problems.append(f"{PKG}/{rel}:{line} imports {mod} (the package of all callbacks)")
    rule = "callbacks never import each other (only callbacks/common and reports)"
    _fail_if(sorted(set(problems)), rule)


def test_only_demos_and_cli_import_the_demos():
    outside = [
        rel
        for name, rel in modules().items()
        if not _is_under(name, f"{PKG}.demos") and name != f"{PKG}.cli"
    ]
    _fail_if(
        _violations(sorted(outside), (f"{PKG}.demos",)),
        "nothing outside demos/ and cli.py imports lightning_memo.demos",
    )


def test_package_init_only_re_exports():
    """``lightning_memo/__init__.py`` holds imports, ``__all__`` and private helpers (the
    version); every public name it binds is in ``__all__`` and every name of ``__all__`` is
    bound."""
    module = tree("__init__.py")
    bound, all_names, problems = {}, None, []
    for node in module.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                bound[alias.asname or alias.name] = node.lineno
        elif isinstance(node, ast.Import):
            problems.append(f"line {node.lineno}: a plain import binds a module, not a name")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            continue
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            for target in node.targets:
                if target.id == "__all__":
                    all_names = ast.literal_eval(node.value)
                elif not (target.id.startswith("__") and target.id.endswith("__")):
                    problems.append(f"line {node.lineno}: defines {target.id}")
        else:
            problems.append(f"line {node.lineno}: {type(node).__name__} (define it in a module)")
    assert all_names is not None, "lightning_memo/__init__.py has no __all__ list"
    public = {n for n in bound if not n.startswith("_")}
    missing = sorted(public - set(all_names))
    problems += [f"line {bound[n]}: {n} is imported but not in __all__" for n in missing]
    problems += [f"__all__ names {n}, which is not imported" for n in all_names if n not in bound]
    if len(set(all_names)) != len(all_names):
        problems.append("__all__ lists a name twice")
    _fail_if([f"{PKG}/__init__.py {p}" for p in problems], "the package's __init__ only re-exports")


def test_all_of_the_package_is_importable():
    """Every name of ``lightning_memo.__all__`` resolves (the AST check above cannot see a
    failing re-export)."""
    for name in lightning_memo.__all__:
        assert getattr(lightning_memo, name, None) is not None, name
