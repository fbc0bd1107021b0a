"""The client is a distribution of its own (client/, `videogen-client`): it declares and imports nothing heavy and
nothing of the server, it builds as a wheel holding only itself, and the server does not import it."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client"
PACKAGE = CLIENT / "videogen_client"
# what a machine that only calls the API must never need: the model stack, Ray, the web server, the server itself
HEAVY = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "ray", "fastapi", "starlette",
         "uvicorn", "boto3", "av", "serve", "deployments")
HEAVY_DISTRIBUTIONS = {"torch", "torchvision", "diffusers", "transformers", "accelerate", "ray", "fastapi",
                       "starlette", "uvicorn", "boto3", "av", "videogen-serve"}


def _project(pyproject: Path) -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+; the wheel test checks 3.10 too")
    return tomllib.loads(pyproject.read_text())["project"]


def _distribution_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_client_distribution_declares_only_light_dependencies():
    project = _project(CLIENT / "pyproject.toml")
    names = {_distribution_name(r) for r in project["dependencies"]}
    assert "httpx" in names
    assert not names & HEAVY_DISTRIBUTIONS, names
    assert not project.get("optional-dependencies"), "an extra would be a way back to the heavy stack"
    assert project["scripts"] == {"videogen": "videogen_client.cli:main"}


def test_the_videogen_command_has_one_owner():
    server = _project(ROOT / "pyproject.toml")
    assert "videogen" not in server.get("scripts", {}), "the videogen command belongs to videogen-client"
    assert all(not v.startswith("videogen_client") for v in server.get("scripts", {}).values())


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_client_source_imports_nothing_heavy_or_of_the_server():
    """Every import counted, also inside functions (the subprocess test below sees only what runs)."""
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imported_modules(p) if n.split(".")[0] in HEAVY)
                 for p in PACKAGE.rglob("*.py")}
    assert len(offenders) >= 3  # __init__, api, cli really scanned
    assert {k: v for k, v in offenders.items() if v} == {}


def test_server_never_imports_the_client():
    """Imports flow toward the API, not back: serve/ and deployments/ do not use the client, except the quick
    start, which submits its sample video through it like any user (a function-level import, never run in pods)."""
    allowed = {"deployments/local.py"}
    users = {str(p.relative_to(ROOT)) for top in ("serve", "deployments") for p in (ROOT / top).rglob("*.py")
             if any(n.split(".")[0] == "videogen_client" for n in _imported_modules(p))}
    assert users <= allowed, users - allowed


_IMPORT_PROBE = """
import importlib.abc, json, sys
HEAVY = set(json.loads(sys.argv[1]))
tried = []

class Refuse(importlib.abc.MetaPathFinder):
    # a heavy module that is merely importable (it is, in the dev venv) must not hide a dependency on it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            tried.append(name)
            raise ImportError(f"videogen_client must not import {name}")
        return None

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, sys.argv[2])
import videogen_client, videogen_client.api, videogen_client.cli
assert videogen_client.__file__.startswith(sys.argv[2]), videogen_client.__file__
code = videogen_client.cli.main(["--help"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"tried": tried, "loaded": loaded, "help_exit": code}))
"""


def test_client_imports_and_runs_without_torch_ray_fastapi_or_serve(tmp_path: Path):
    """In a fresh interpreter (isolated mode, outside the checkout), the client imports and its CLI runs while
    every heavy module and the server's packages refuse to import."""
    out = subprocess.run([sys.executable, "-I", "-c", _IMPORT_PROBE, json.dumps(HEAVY), str(CLIENT)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"tried": [], "loaded": [], "help_exit": 0}, result


def test_client_builds_a_wheel_of_itself_alone(tmp_path: Path):
    """The wheel pip would install: only videogen_client, requiring only what pyproject.toml declares, with the
    videogen command. Built from a copy (setuptools writes build/ and egg-info beside the sources), offline."""
    src = tmp_path / "src"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, env=env, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("videogen_client-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"videogen_client", info}, names
    assert {"videogen_client/__init__.py", "videogen_client/api.py", "videogen_client/cli.py"} <= set(names)
    requires = {_distribution_name(line.split(":", 1)[1]) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}
    assert "httpx" in requires and not requires & HEAVY_DISTRIBUTIONS, requires
    assert "videogen = videogen_client.cli:main" in entry_points
