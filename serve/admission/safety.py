"""Prompt policy: the safety gate of admission, after validation and before any job is written or GPU used.

`Admission.check` calls `enforce(policy, prompt)`: a blocked-term match (cheap, local) and then, if one is
configured, a classifier callable. A policy block is a 400 `content_policy`; a classifier that fails or times out
is a 503 `safety_unavailable` (with `fail_closed`), so clients can tell "rephrase" from "retry later".

Only the prompt is checked: a negative prompt names what the video must *not* show, and refusing a request for
what its negative prompt mentions would refuse exactly the careful users.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from serve.admission.terms import _compile, _Forms
from serve.config.safety import SafetyConfig
from serve.errors import ServiceError

log = logging.getLogger(__name__)

Classifier = Callable[[str], "bool | float"]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # "blocked_term" | "classifier" | "classifier_unavailable"
    category: str | None = None  # the blocked term's category, or "classifier"


ALLOWED = Verdict(True)



def load_classifier(path: str) -> Classifier:
    """Import `module:attr` once at start-up, so a typo fails the deployment rather than every request."""
    module_name, _, attr = path.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"safety.classifier {path!r}: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"safety.classifier {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"safety.classifier {path!r} is not callable")
    return obj  # type: ignore[return-value]


class PromptPolicy:
    def __init__(self, config: SafetyConfig, classifier: Classifier | None = None) -> None:
        self.config = config
        self._terms = [_compile(cat, t) for cat, items in config.blocked_terms.items() for t in items]
        if classifier is None and config.classifier:
            classifier = load_classifier(config.classifier)
        self._classifier = classifier
        # a pool, not a thread per call: a hung classifier then ties up at most max_workers threads (its calls
        # queue and time out, i.e. fail closed) instead of growing without bound
        self._pool = (ThreadPoolExecutor(config.classifier_max_workers, thread_name_prefix="safety-classifier")
                      if classifier is not None else None)

    def check(self, prompt: str, negative_prompt: str | None = None) -> Verdict:
        """`negative_prompt` is accepted for symmetry and deliberately not checked (module docstring)."""
        if not self.config.enabled:
            return ALLOWED
        forms = _Forms(prompt)
        for term in self._terms:
            if forms.matches(term):
                return Verdict(False, "blocked_term", term.category)
        if self._classifier is None or self._pool is None:
            return ALLOWED
        return self._classify(self._pool, self._classifier, prompt)

    def _classify(self, pool: ThreadPoolExecutor, classifier: Classifier, prompt: str) -> Verdict:
        try:
            result = pool.submit(classifier, prompt).result(timeout=self.config.classifier_timeout_s)
            blocked = _is_block(result, self.config.classifier_threshold)
        except TimeoutError:
            failure = f"timed out after {self.config.classifier_timeout_s}s"
        except Exception as exc:  # any failure of third-party code is "unavailable", never "allowed" by accident
            failure = f"raised {type(exc).__name__}"
        else:
            return Verdict(False, "classifier", "classifier") if blocked else ALLOWED
        log.warning("safety classifier %s; %s the prompt", failure,
                    "refusing" if self.config.fail_closed else "allowing")
        return Verdict(False, "classifier_unavailable") if self.config.fail_closed else ALLOWED

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _is_block(result: object, threshold: float) -> bool:
    if isinstance(result, bool):
        return result
    if isinstance(result, (int, float)) and math.isfinite(result):
        return result >= threshold
    raise TypeError(f"classifier returned {type(result).__name__}, expected bool or a finite score")


def enforce(policy: PromptPolicy, prompt: str, negative_prompt: str | None = None) -> None:
    """Raise the API error for a refused prompt. The message names the category, never the matched text."""
    verdict = policy.check(prompt, negative_prompt)
    if verdict.allowed:
        return
    # the prompt itself is not logged: it may hold personal data, and the log is not the place to keep it
    log.info("prompt refused: reason=%s category=%s", verdict.reason, verdict.category)
    if verdict.reason == "classifier_unavailable":
        raise ServiceError(503, "the content safety check is unavailable right now; retry later",
                       code="safety_unavailable", headers={"Retry-After": str(policy.config.retry_after_s)})
    raise ServiceError(400, f"the prompt was refused by the content policy (category: {verdict.category}); "
                        "rephrase it", param="prompt", code="content_policy")
