"""Dependencies honest: every third-party import of the shipped packages is declared, every declared dependency is
imported, and the main install (`pip install -e .`, no extras) does not pull in torch."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
PACKAGES = ("kvjax", "pallas_kernels", "checkpoints_convert")
# Imports that belong to an extra, in the one module that makes them (imported lazily, with a message naming it).
OPTIONAL = {
    "kvjax/eval/peer_bench.py": {"torch", "transformers", "kvpress"},  # [compare], [compare-kvpress]
    "checkpoints_convert/tiny_checkpoints.py": {"torch", "transformers"},  # the tests' tiny checkpoints, [test]
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def _imports() -> dict[str, set[str]]:
    """file -> the top-level names of the modules it imports (absolute imports only)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            names = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
            found[path.relative_to(ROOT).as_posix()] = names
    return found


def _third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES and n != "__future__"}


def test_every_import_is_declared():
    declared = {_canonical(r.name) for r in _dependencies()}
    modules = packages_distributions()
    for file, names in _imports().items():
        for name in sorted(_third_party(names) - OPTIONAL.get(file, set())):
            providers = {_canonical(d) for d in modules.get(name, [name])}
            assert providers & declared, f"{file} imports {name} ({', '.join(sorted(providers))}), not declared"


def test_every_dependency_is_imported():
    imported = {name for names in _imports().values() for name in _third_party(names)}
    providers = {_canonical(d) for name in imported for d in packages_distributions().get(name, [name])}
    unused = [r.name for r in _dependencies() if _canonical(r.name) not in providers]
    assert not unused, f"declared but never imported: {unused}"


def test_the_main_install_does_not_pull_in_torch():
    """The closure of the declared dependencies over the installed packages' own requirements (no extras)."""
    seen, todo = set(), list(_dependencies())
    while todo:
        requirement = todo.pop()
        name = _canonical(requirement.name)
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(text) for text in distribution(requirement.name).requires or []]
        except PackageNotFoundError:  # an optional platform package not installed here
            continue
    assert {"jax", "flax", "einops", "pyyaml"} <= seen
    assert not seen & {"torch", "transformers", "safetensors"}, sorted(seen)
