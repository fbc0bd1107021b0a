"""`safety:` config section: blocked terms and the optional classifier (a leaf beside the term matcher)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.admission.terms import _compile

# AN EXAMPLE, NOT A POLICY: a few terms per category to show the shape (English and Chinese). Operators replace
# it through `safety.blocked_terms` with their own list, and put the real judgement in a classifier.
DEFAULT_BLOCKED_TERMS: dict[str, list[str]] = {
    "violence-extreme": ["behead", "beheading", "dismember", "dismemberment", "斩首", "砍头", "肢解"],
    "csam": ["child porn", "child pornography", "underage nude", "儿童色情", "幼女色情"],
    "weapons": ["pipe bomb", "nail bomb", "ghost gun", "土制炸弹", "自制炸弹", "制造炸弹"],
}

class SafetyConfig(BaseModel):
    """The prompt policy; wired into AppConfig (e.g. as `safety`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Check prompts at all.")
    blocked_terms: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_BLOCKED_TERMS.items()},
        description="Category -> terms (any script). The default is a short EXAMPLE; replace it.",
    )
    classifier: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="'module:callable' taking the prompt, returning True or a score (>= threshold blocks).",
    )
    classifier_threshold: float = Field(default=0.5, ge=0, le=1, description="Score at which a prompt is blocked.")
    classifier_timeout_s: float = Field(default=2.0, gt=0, description="Longest wait for the classifier.")
    classifier_max_workers: int = Field(default=4, ge=1, description="Classifier calls in flight per replica.")
    fail_closed: bool = Field(
        default=True, description="Refuse (503) when the classifier fails or times out; False lets the prompt by."
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After of the 503 when the classifier is down.")

    @field_validator("blocked_terms")
    @classmethod
    def _compilable(cls, terms: dict[str, list[str]]) -> dict[str, list[str]]:
        for category, items in terms.items():
            if not category.strip():
                raise ValueError("blocked_terms: category names must not be empty")
            for term in items:
                _compile(category, term)
        return terms

