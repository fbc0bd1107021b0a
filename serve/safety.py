"""Prompt policy: the safety stage of the ingress, after validation and before any job is written or GPU used.

`VideoService.create` calls `enforce(policy, prompt)`: a blocked-term match (cheap, local) and then, if one is
configured, a classifier callable. A policy block is a 400 `content_policy`; a classifier that fails or times out
is a 503 `safety_unavailable` (with `fail_closed`), so clients can tell "rephrase" from "retry later".

Only the prompt is checked. A negative prompt names what the video must *not* show ("no blood, no violence"),
and with classifier-free guidance (only used at guidance_scale > 1, see serve/stages/denoising.py) the sampler
is pushed away from it, so refusing a request for what its negative prompt mentions would refuse exactly the
careful users.

Matching survives the usual evasions: case, full-width and other compatibility forms, invisible characters,
accents, Cyrillic/Greek look-alikes, separators between letters ("k.i.l.l", "k i l l") and leetspeak
("k1ll"), and Chinese/Japanese/Korean terms with spaces or punctuation inserted. Latin-script terms match whole
words only, so "skill" or "Scunthorpe" never trip "kill" or a four-letter term inside them.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.api.errors import ApiError

log = logging.getLogger(__name__)

Classifier = Callable[[str], "bool | float"]

# AN EXAMPLE, NOT A POLICY: a few terms per category to show the shape (English and Chinese). Operators replace
# it through `safety.blocked_terms` with their own list, and put the real judgement in a classifier.
DEFAULT_BLOCKED_TERMS: dict[str, list[str]] = {
    "violence-extreme": ["behead", "beheading", "dismember", "dismemberment", "斩首", "砍头", "肢解"],
    "csam": ["child porn", "child pornography", "underage nude", "儿童色情", "幼女色情"],
    "weapons": ["pipe bomb", "nail bomb", "ghost gun", "土制炸弹", "自制炸弹", "制造炸弹"],
}

# Look-alikes of Latin letters, upper and lower case (mapped before case folding so that, e.g., Greek 'Η' can
# become 'h' while 'η' becomes 'n'). NFKD already handles full-width, mathematical and circled letters.
_HOMOGLYPHS = str.maketrans(
    "аеорсухіјѕԁһӏԛԝкмнтвпү" "АЕОРСУХІЈЅКМНТВ" "αβγεηικμνορτυχως" "ΑΒΕΗΙΚΜΝΟΡΤΥΧΖ"
    "ıɩɡɑᴀʙᴄᴅᴇɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ" "օսհ",
    "aeopcyxijsdhlqwkmhtbny" "AEOPCYXIJSKMHTB" "abyenikuvoptuxwc" "ABEHIKMNOPTYXZ"
    "iigaabcdeghijklmnoprstuvwyz" "ouh",
)
_LEET = str.maketrans("013457@$", "oieastas")
# invisible, yet letters or symbols (not category Cf): the Hangul fillers and the blank Braille pattern
_INVISIBLE = dict.fromkeys(map(ord, "\u115f\u1160\u3164\uffa0\u2800"))
# scripts written without spaces between words: terms there match as substrings
_CJK = "\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
_CJK_RE = re.compile(f"[{_CJK}]")
# a token: a run of CJK characters, or a run of other letters/digits (so "我想kill他" yields "kill")
_TOKEN_RE = re.compile(f"[{_CJK}]+|[^\\W_{_CJK}]+")
# separators between letters leave tokens this short ("k.i.l.l", "ki ll"); longer tokens are real words
_SHORT = 2
# terms shorter than this only match as whole words: squeezing and leetspeak on e.g. "gun" would hit far too
# much ordinary text
_MIN_SQUEEZED = 4


def normalise(text: str) -> str:
    """Compatibility forms, accents, invisible characters and look-alikes removed; case folded."""
    text = unicodedata.normalize("NFKD", text)  # 'Ｋ' -> 'K', '𝐤' -> 'k', 'í' -> 'i' + accent
    # Cf: zero-width space/joiners, word joiner, BOM, soft hyphen, tags; Mn/Me: accents, variation selectors
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Mn", "Me")).translate(_INVISIBLE)
    text = text.translate(_HOMOGLYPHS).casefold()
    return unicodedata.normalize("NFKC", text)  # recompose (Hangul) after NFKD


def tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


@dataclass(frozen=True)
class _Term:
    category: str
    words: str  # " child porn ": whole tokens, space-padded, matched against the padded prompt
    leet_words: str
    squeezed: str  # "childporn", after leetspeak
    joined: str  # "childporn", without leetspeak: CJK terms match this as a substring
    cjk: bool


def _compile(category: str, term: str) -> _Term:
    norm = normalise(term)
    plain, leet = tokens(norm), tokens(norm.translate(_LEET))
    if not plain:
        raise ValueError(f"blocked term {term!r} ({category}) has no letters or digits")
    return _Term(category, f" {' '.join(plain)} ", f" {' '.join(leet)} ", "".join(leet), "".join(plain),
                 bool(_CJK_RE.search(norm)))


class _Forms:
    """The views of one prompt that terms are matched against."""

    def __init__(self, prompt: str) -> None:
        norm = normalise(prompt)
        plain = tokens(norm)
        leet = tokens(norm.translate(_LEET))
        self.words = f" {' '.join(plain)} "
        self.leet_words = f" {' '.join(leet)} "
        self.joined = "".join(plain)  # for CJK: no word boundaries to respect
        # runs of >= 2 consecutive short tokens, concatenated, with the offsets where tokens start and end
        self.runs: list[tuple[str, frozenset[int]]] = []
        run: list[str] = []
        for tok in [*leet, ""]:
            if tok and len(tok) <= _SHORT:
                run.append(tok)
                continue
            if len(run) >= 2:
                offsets, pos = {0}, 0
                for part in run:
                    pos += len(part)
                    offsets.add(pos)
                self.runs.append(("".join(run), frozenset(offsets)))
            run = []

    def matches(self, term: _Term) -> bool:
        if term.cjk:
            return term.joined in self.joined
        if term.words in self.words:
            return True
        if len(term.squeezed) < _MIN_SQUEEZED:
            return False
        if term.leet_words in self.leet_words:
            return True
        for joined, offsets in self.runs:
            # the term must start and end where chunks do: "sk il l" spells 'skill', not 'kill'
            start = joined.find(term.squeezed)
            while start != -1:
                if start in offsets and start + len(term.squeezed) in offsets:
                    return True
                start = joined.find(term.squeezed, start + 1)
        return False


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # "blocked_term" | "classifier" | "classifier_unavailable"
    category: str | None = None  # the blocked term's category, or "classifier"


ALLOWED = Verdict(True)


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
        raise ApiError(503, "the content safety check is unavailable right now; retry later",
                       code="safety_unavailable", headers={"Retry-After": str(policy.config.retry_after_s)})
    raise ApiError(400, f"the prompt was refused by the content policy (category: {verdict.category}); "
                        "rephrase it", param="prompt", code="content_policy")
