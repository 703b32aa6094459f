"""Helpers shared by the frontends: turning source names into unique IR identifiers, and
the refusals a frontend collects over a whole model."""
from __future__ import annotations

import re

from epc.compiler.errors import EpcError

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


# --------------------------------------------------------------------------- refusals
class Refused(EpcError):
    """One source op the IR cannot express: the frontends raise it per op (its message is
    the whole one-line refusal) and collect them all before giving up on a model.

    op:           the source op ('Sigmoid', 'aten.silu.default');
    node:         how the source names this one ("node 'features.0/Sigmoid'");
    reason:       what the IR cannot express about it;
    substitutable: whether `--substitute` would compile it as its nearest linear form."""

    def __init__(self, message: str, *, op: str, node: str, reason: str,
                 substitutable: bool = False):
        super().__init__(message)
        self.op, self.node, self.reason = op, node, reason
        self.substitutable = substitutable


class Unsupported(EpcError):
    """Every op of one model that the IR cannot express, in one line: each op with its
    count and first node, what `--substitute` would replace, and what is supported.
    `refusals` holds them all (the compatibility report of `epc compile --check`)."""

    def __init__(self, source: str, refusals: "list[Refused]", supported: str):
        self.source, self.refusals, self.supported = source, list(refusals), supported
        if len(self.refusals) == 1:
            msg = str(self.refusals[0])
        else:
            groups = group_refusals(self.refusals)
            kinds = "; ".join(f"{op} x{len(rs)} (first: {rs[0].node}: {rs[0].reason})"
                              for op, rs in groups.items())
            msg = (f"{source}: {len(self.refusals)} unsupported ops of {len(groups)} "
                   f"kind{'s' if len(groups) > 1 else ''}: {kinds}")
            sub = [op for op, rs in groups.items() if all(r.substitutable for r in rs)]
            if sub:
                msg += f"; --substitute replaces {', '.join(sub)}"
            msg += f"; supported: {supported}"
        super().__init__(msg)


def group_refusals(refusals) -> "dict[str, list[Refused]]":
    """The refusals by source op, in the order each op was first refused."""
    groups: dict[str, list] = {}
    for r in refusals:
        groups.setdefault(r.op, []).append(r)
    return groups
