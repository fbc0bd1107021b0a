"""The client is a distribution of its own (client/, `videogen-client`): it declares and imports nothing heavy and
nothing of the server, it builds as a wheel holding only itself, that wheel installs into a brand-new venv (no
system site packages) with httpx alone and the `videogen` command runs there, and the server does not import it."""

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


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client's wheel, built once from a copy (setuptools writes build/ and egg-info beside the sources),
    offline, with the dev venv's setuptools."""
    tmp = tmp_path_factory.mktemp("client-wheel")
    src = tmp / "src"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, env=env, timeout=120)
    (wheel,) = (tmp / "dist").glob("videogen_client-*.whl")
    return wheel


def test_client_builds_a_wheel_of_itself_alone(client_wheel: Path):
    """The wheel pip would install: only videogen_client, requiring only what pyproject.toml declares, with the
    videogen command."""
    with zipfile.ZipFile(client_wheel) as zf:
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


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point a child at the dev venv or the checkout."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "CONDA_PREFIX"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


_VENV_PROBE = """
import importlib.metadata, importlib.util, json, sys, sysconfig
import videogen_client, videogen_client.api, videogen_client.cli
print(json.dumps({
    "file": videogen_client.__file__, "purelib": sysconfig.get_paths()["purelib"], "prefix": sys.prefix,
    "path": sys.path,
    "distributions": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
    "importable": sorted(m for m in json.loads(sys.argv[1]) if importlib.util.find_spec(m) is not None),
}))
"""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_light_client_installs_and_runs_in_a_fresh_venv(tmp_path: Path):
    """What a user does on a machine that only calls the API: a new venv (no system site packages),
    `pip install ./client`, run `videogen`. pip's configured index supplies the build backend (setuptools, in
    pip's isolated build) and httpx with its dependencies; nothing heavy comes along, and nothing of the checkout
    or the dev venv is visible there. (From a copy of client/: the build writes egg-info beside the sources.)"""
    src = tmp_path / "client"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, env=env,
                   cwd=tmp_path, timeout=120)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "./client"], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=240, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    # the console script pip wrote
    helped = subprocess.run([str(bindir / "videogen"), "--help"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60, check=False)
    assert helped.returncode == 0, helped.stderr
    assert "usage: videogen" in helped.stdout and "generate" in helped.stdout
    # what is installed: the client, httpx and its own dependencies only
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    installed = {_normalized(d["name"]) for d in json.loads(listed.stdout)}
    assert {"videogen-client", "httpx"} <= installed, installed
    assert not installed & HEAVY_DISTRIBUTIONS, installed & HEAVY_DISTRIBUTIONS
    # imported from the venv, isolated mode (-I: no cwd, no user site), and nothing heavy even findable
    probe = subprocess.run([str(python), "-I", "-c", _VENV_PROBE, json.dumps(HEAVY)], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(Path(result["purelib"])), result["file"]
    assert Path(result["prefix"]) == venv.resolve() or Path(result["prefix"]) == venv
    assert not [p for p in result["path"] if p and Path(p).resolve().is_relative_to(ROOT)], result["path"]
    assert result["importable"] == [], result["importable"]
    assert {_normalized(n) for n in result["distributions"]} == installed
