"""Helpers shared by the frontends: turning source names into unique IR identifiers."""
from __future__ import annotations

import re

_BAD = re.compile(r"[^A-Za-z0-9_.]+")


def sanitize(name: str, fallback: str = "v") -> str:
    """A source name as an IR identifier `[A-Za-z_][A-Za-z0-9_.]*`.

    '/' (the path separator both torch exporters use in node names) becomes '.', other
    characters outside the identifier set become '_', and a leading digit gets a '_' prefix
    ('0.weight' -> '_0.weight').
    """
    s = name.strip().strip("/").replace("/", ".").replace("::", ".")
    s = _BAD.sub("_", s)
    s = re.sub(r"\.{2,}", ".", s).strip(".")
    if not s:
        s = fallback
    if not (s[0].isalpha() or s[0] == "_"):
        s = "_" + s
    return s


class NameTable:
    """Hands out identifiers that are unique within one graph."""

    def __init__(self, taken=()):
        self.taken: set[str] = set(taken)

    def unique(self, name: str, fallback: str = "v") -> str:
        base = sanitize(name, fallback)
        if base not in self.taken:
            self.taken.add(base)
            return base
        i = 1
        while f"{base}_{i}" in self.taken:
            i += 1
        out = f"{base}_{i}"
        self.taken.add(out)
        return out
