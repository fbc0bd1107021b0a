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



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """serve/ module -> the serve/ modules it imports, every import counted: at module level, inside
    functions and under TYPE_CHECKING alike (a lazy import that dodges a circle is still a circle)."""
    files = {_module_name(p): p for p in (ROOT / "serve").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from serve.x import y` names module serve.x.y when y is one, else something of serve.x
                candidates = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                              for a in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in files and c != name}
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_among_serve_modules():
    graph = import_graph()
    assert len(graph) > 40 and graph["serve.jobs.service"]  # the graph is really built
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_sections_are_leaves():
    """serve/config/ imports only pydantic, the presets, each other and the pure-text term matcher."""
    graph = import_graph()
    allowed = {"serve.presets", "serve.admission.terms"}
    for module, targets in graph.items():
        if module.startswith("serve.config"):
            assert all(t.startswith("serve.config") or t in allowed for t in targets), (module, targets)


def test_the_job_layer_never_imports_the_http_layer():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith(("serve.jobs", "serve.admission", "serve.billing", "serve.tenancy", "serve.webhooks",
                              "serve.stages", "serve.media", "serve.config")):
            assert not [t for t in targets if t.startswith("serve.api") and t != "serve.api.wire"], (module, targets)


def test_config_and_job_layer_import_no_web_stack_torch_or_ray():
    """What every replica and tool imports to read its config, and what the ingress's job layer is, load
    neither the HTTP stack (fastapi, starlette, httpx) nor torch nor Ray."""
    import subprocess
    import sys

    modules = ["serve.config", "serve.jobs.service", "serve.jobs.runner", "serve.jobs.store", "serve.jobs.hooks",
               "serve.admission.gate", "serve.billing.usage", "serve.stages.types"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "heavy = sorted(n for n in ('fastapi', 'starlette', 'httpx', 'torch', 'ray', 'diffusers') if n in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_one_composition_root_builds_the_ingress_graph():
    """Only serve/jobs/wiring.py constructs the job layer's objects; deployments/ and serve/ call it."""
    built_here = {"VideoService", "JobRunner", "Admission", "JobEnd", "VideoView"}
    offenders = []
    for path in [*(ROOT / "serve").rglob("*.py"), *(ROOT / "deployments").rglob("*.py")]:
        if path == ROOT / "serve" / "jobs" / "wiring.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in built_here:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}(...)")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "on_finished"
                                                    for t in node.targets):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} patches on_finished")
    assert offenders == []
    assert "build_ingress(" in (ROOT / "deployments" / "ingress.py").read_text()
