"""nginx.conf as data for the front-proxy tests: parse the shipped file into directives, look them up by context,
override a few (addresses, paths, timeouts) and write it back for a local nginx to run.

The grammar nginx reads: `name arg ... ;` or `name arg ... { ... }`, `#` comments outside quotes, arguments bare or
in single or double quotes (a quoted `{`, `;` or `#` is text). Enough for the file we ship; not a validator (a real
nginx does that: `nginx -t` in the tests).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class Directive:
    name: str
    raw: list[str]  # the arguments as written (quotes kept), for writing the file back
    block: list[Directive] | None = None
    line: int = 0

    @property
    def args(self) -> list[str]:
        """The arguments as nginx reads them: quotes removed, escapes read."""
        return [_unquote(a) for a in self.raw]

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        found = self.find(name)
        assert len(found) == 1, f"expected one {name!r} in {self.name} (line {self.line}), got {len(found)}"
        return found[0]


@dataclass
class Config:
    directives: list[Directive] = field(default_factory=list)

    def main(self) -> Directive:
        return Directive("main", [], self.directives)

    def http(self) -> Directive:
        return self.main().one("http")

    def server_listening(self, port: int) -> Directive:
        """The `server` block of `http` with a `listen` on `port`."""
        found = [s for s in self.http().find("server")
                 if any(_port_of(d.args[0]) == port for d in s.find("listen"))]
        assert len(found) == 1, f"expected one server listening on {port}, got {len(found)}"
        return found[0]

    def text(self) -> str:
        return "".join(_write(d, 0) for d in self.directives)


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def _unquote(token: str) -> str:
    """As nginx reads a quoted argument: `\\n`, `\\r`, `\\t` are control characters, `\\x` is x otherwise."""
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), token[1:-1])
    return token


def _port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def _tokens(text: str) -> Iterator[tuple[str, int]]:
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};":
            yield c, line
            i += 1
        elif c in "'\"":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ValueError(f"line {line}: unterminated quote")
            token = text[i:j + 1]
            line += token.count("\n")
            yield token, line
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "{};":
                j += 1
            yield text[i:j], line
            i = j


def parse(text: str) -> Config:
    stack: list[list[Directive]] = [[]]
    words: list[str] = []
    start = 0
    for token, line in _tokens(text):
        if token in (";", "{"):
            if not words:
                raise ValueError(f"line {line}: {token!r} without a directive")
            directive = Directive(words[0], words[1:], [] if token == "{" else None, start)
            stack[-1].append(directive)
            if token == "{":
                stack.append(directive.block)  # type: ignore[arg-type]
            words = []
        elif token == "}":
            if words or len(stack) == 1:
                raise ValueError(f"line {line}: unexpected '}}'")
            stack.pop()
        else:
            if not words:
                start = line
            words.append(token)
    if words or len(stack) != 1:
        raise ValueError("unexpected end of file")
    return Config(stack[0])


def _write(d: Directive, depth: int) -> str:
    pad = "    " * depth
    head = " ".join([d.name, *d.raw])
    if d.block is None:
        return f"{pad}{head};\n"
    return f"{pad}{head} {{\n" + "".join(_write(c, depth + 1) for c in d.block) + f"{pad}}}\n"


def size_bytes(value: str) -> int:
    """An nginx size (`25m`, `16k`, `1024`) in bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)", value.lower())
    assert match, f"not an nginx size: {value!r}"
    return int(match.group(1)) * _UNITS[match.group(2)]


def seconds(value: str) -> float:
    """An nginx time (`10s`, `1m`, `500ms`, `30` = seconds) in seconds; one unit only, as the file writes them."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value.lower())
    assert match, f"not a single-unit nginx time: {value!r}"
    return int(match.group(1)) * _TIME_UNITS[match.group(2) or "s"]
