"""The docs stay true to the code: configuration examples in README validate as the service's config."""

from pathlib import Path

import yaml

from serve.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_readme_yaml_examples_are_valid_configs():
    """README's YAML snippets that configure a model validate as the service's config, so the docs stay true."""
    readme = (ROOT / "README.md").read_text()
    blocks = [yaml.safe_load(b.split("```", 1)[0]) for b in readme.split("```yaml\n")[1:]]
    models = [b["model"] for b in blocks if isinstance(b, dict) and "model" in b]
    assert models, "README has no model config example"
    for model in models:
        ModelConfig.model_validate(model)


def _readme_tree() -> set[str]:
    """The module paths README's "How it is built" lists: `name.py` lines under their `folder/` lines."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## How it is built\n\n```\n", 1)[1].split("```", 1)[0]
    paths, folders = set(), {}
    for line in block.splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        if name.endswith("/"):
            folders[depth] = name
            for deeper in [d for d in folders if d > depth]:
                del folders[deeper]
        elif name.endswith(".py"):
            paths.add("".join(folders[d] for d in sorted(folders) if d < depth) + name)
    return paths


def test_readme_tree_lists_every_module_once_and_nothing_else():
    """One line per module of serve/, deployments/ and the client's package (empty or docstring-only package
    markers aside); client/videogen_client, not client/, so a local build/ of the client is not counted."""
    import ast

    def counts(path: Path) -> bool:
        body = ast.parse(path.read_text()).body
        return not (path.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body))

    tops = ("serve", "deployments", "client/videogen_client")
    actual = {str(p.relative_to(ROOT)) for top in tops for p in (ROOT / top).rglob("*.py") if counts(p)}
    listed = _readme_tree()
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))
