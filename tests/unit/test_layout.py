"""Imports flow deployments -> serve: `serve/` never imports Ray, and only `deployments/` imports ray.serve."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_serve_package_never_imports_ray():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n == "ray" or n.startswith("ray."))
                 for p in (ROOT / "serve").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_project_modules_are_imported_by_full_path_in_deployments():
    # `from ray import serve` binds `serve`; a bare `import serve` there would be ambiguous
    for p in (ROOT / "deployments").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                assert all(a.name != "serve" for a in node.names), p

