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
