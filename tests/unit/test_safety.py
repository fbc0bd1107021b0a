"""Prompt policy: evasions of the blocked-term list are caught, ordinary words are not, and the classifier hook
fails closed (503) or open as configured."""

from __future__ import annotations

import logging
import threading

import pytest
from pydantic import ValidationError

from serve.admission.safety import PromptPolicy, Verdict, enforce
from serve.admission.terms import normalise
from serve.config.safety import SafetyConfig
from serve.errors import ServiceError

TERMS = {
    "violence-extreme": ["kill", "behead", "斩首"],
    "csam": ["child porn"],
    "weapons": ["gun"],
}


@pytest.fixture
def policy():
    p = PromptPolicy(SafetyConfig(blocked_terms=TERMS))
    yield p
    p.close()


@pytest.mark.parametrize("prompt", [
    "a man tries to kill a dragon",
    "KILL the lights",  # case
    "ＫＩＬＬ",  # full-width
    "𝐤𝐢𝐥𝐥 everyone",  # mathematical bold
    "ki\u200bll",  # zero-width space inside the word
    "k\u00adi\u2060l\ufeffl",  # soft hyphen, word joiner, BOM
    "kіll",  # Cyrillic і
    "КІLL",  # Cyrillic К and І
    "kíll",  # accent
    "k.i.l.l them",
    "k i l l",
    "k-i-l-l",
    "k_i_l_l",
    "ki ll",
    "k1ll",  # leetspeak
    "k!ll k1ll",
    "$ome k.1.l.l",
    "ch1ld p0rn",
    "c.h.i.l.d p.o.r.n",
    "斩首",
    "斩 首 视频",  # Chinese with spaces
    "斩，首！",  # and with punctuation
    "斩\u200b首",
    "我想kill他",  # an English term inside Chinese text
    "buy a gun",  # a short term still matches as a whole word
])
def test_blocked(policy, prompt):
    verdict = policy.check(prompt)
    assert not verdict.allowed and verdict.reason == "blocked_term", prompt


@pytest.mark.parametrize("prompt", [
    "a skilled painter at work",
    "skill",
    "a skill set",
    "Scunthorpe United wins",  # a term inside a longer word
    "killer whale breaching",  # whole words only: 'killer' is not 'kill'
    "she wants to be head chef",  # two real words that join to 'behead'
    "vitamin k ill effects",
    "a begun journey, gunwale, shogun",
    "children playing in a park",
    "斩获冠军",  # shares one character with a Chinese term
    "no violence at all",
    "sk il l",  # spaced letters: 'kill' would start inside the first chunk, so this is 'skill'
    "g u n",  # terms under 4 letters match whole words only; squeezing them would hit ordinary text
])
def test_allowed(policy, prompt):
    assert policy.check(prompt) == Verdict(True), prompt


def test_normalise():
    assert normalise("ＫＩＬＬ") == "kill"
    assert normalise("Ｋі\u200bll") == "kill"
    assert normalise("ΗΕΑD") == "head"


def test_negative_prompt_is_not_checked(policy):
    # blocking "no killing, no gore" in a negative prompt would refuse exactly the careful users
    assert policy.check("a calm beach at dawn", negative_prompt="kill, gun, 斩首").allowed
    enforce(policy, "a calm beach at dawn", negative_prompt="kill")


def test_enforce_raises_a_generic_400(policy, caplog):
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ServiceError) as err:
            enforce(policy, "please k.i.l.l the knight")
    e = err.value
    assert (e.status, e.code, e.param) == (400, "content_policy", "prompt")
    assert "violence-extreme" in e.message and "kill" not in e.message.lower()
    assert "knight" not in caplog.text  # the prompt is not logged


def test_disabled_policy_allows_everything():
    assert PromptPolicy(SafetyConfig(enabled=False, blocked_terms=TERMS)).check("kill").allowed


def test_default_example_list_covers_english_and_chinese():
    p = PromptPolicy(SafetyConfig())
    assert p.check("how to build a p.i.p.e b.o.m.b").category == "weapons"
    assert p.check("儿童 色情").category == "csam"
    assert p.check("a cat playing the piano").allowed


def test_terms_without_letters_are_a_config_error():
    with pytest.raises(ValidationError, match="no letters or digits"):
        SafetyConfig(blocked_terms={"x": ["..."]})
    with pytest.raises(ValidationError):
        SafetyConfig(classifier="not a path")


# -- classifier hook -----------------------------------------------------------------------------
class FlagClassifier:
    """The test classifier: blocks prompts containing 'dragon', records what it saw."""

    def __init__(self, result_for_dragon: bool | float = True, other: bool | float = False) -> None:
        self.seen: list[str] = []
        self.hit, self.other = result_for_dragon, other

    def __call__(self, text: str) -> bool | float:
        self.seen.append(text)
        return self.hit if "dragon" in text else self.other


def _policy(classifier, **cfg) -> PromptPolicy:
    return PromptPolicy(SafetyConfig(blocked_terms=TERMS, **cfg), classifier=classifier)


def test_classifier_blocks_with_bool_or_score():
    clf = FlagClassifier()
    p = _policy(clf)
    assert p.check("a red dragon") == Verdict(False, "classifier", "classifier")
    assert p.check("a red fox").allowed
    assert clf.seen == ["a red dragon", "a red fox"]
    with pytest.raises(ServiceError) as err:
        enforce(p, "a red dragon")
    assert err.value.code == "content_policy"
    p.close()

    scored = _policy(FlagClassifier(0.9, 0.2), classifier_threshold=0.5)
    assert not scored.check("dragon").allowed and scored.check("fox").allowed
    scored.close()


def test_terms_are_checked_before_the_classifier():
    clf = FlagClassifier()
    p = _policy(clf)
    assert p.check("kill").reason == "blocked_term" and clf.seen == []
    p.close()


def _raising(text: str) -> bool:
    raise RuntimeError("model server down")


def test_classifier_failure_is_503_when_fail_closed(caplog):
    p = _policy(_raising, retry_after_s=7)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ServiceError) as err:
            enforce(p, "a red fox")
    e = err.value
    assert (e.status, e.code, e.headers) == (503, "safety_unavailable", {"Retry-After": "7"})
    assert "RuntimeError" in caplog.text and "refusing" in caplog.text
    p.close()


def test_classifier_failure_allows_when_fail_open():
    p = _policy(_raising, fail_closed=False)
    assert p.check("a red fox").allowed
    p.close()


def test_classifier_bad_return_value_counts_as_failure():
    p = _policy(lambda text: "yes")
    assert p.check("a red fox").reason == "classifier_unavailable"
    p.close()


def test_classifier_timeout_fails_closed():
    release = threading.Event()
    p = _policy(lambda text: release.wait(5) and False, classifier_timeout_s=0.05)
    try:
        assert p.check("a red fox") == Verdict(False, "classifier_unavailable")
    finally:
        release.set()
        p.close()


def test_classifier_from_import_path():
    # operator.truth: any non-empty prompt is "flagged", which shows the path was imported and called
    p = PromptPolicy(SafetyConfig(blocked_terms={}, classifier="operator:truth"))
    assert p.check("a red fox").reason == "classifier"
    p.close()
    with pytest.raises(ValueError, match="cannot import"):
        PromptPolicy(SafetyConfig(classifier="no_such_module_xyz:check"))
    with pytest.raises(ValueError, match="no attribute"):
        PromptPolicy(SafetyConfig(classifier="operator:no_such_function"))
