"""How prompts and blocked terms are normalised and matched (pure text, no configuration, no I/O).

Matching survives the usual evasions: case, full-width and other compatibility forms, invisible characters,
accents, Cyrillic/Greek look-alikes, separators between letters and leetspeak, and CJK terms with spaces or
punctuation inserted. Latin-script terms match whole words only.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

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

