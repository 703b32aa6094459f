"""A small FileCheck (after LLVM's) for the pass tests: ordered pattern lines over a text.

Directives are comment lines `# PREFIX: pattern` (PREFIX is CHECK unless a RUN line names
another), one pattern each, matched within one line of the output: literally, except for
`{{regex}}` parts; leading and trailing blanks of a pattern are ignored.

    PREFIX:       the pattern occurs at or after the end of the previous match
    PREFIX-NEXT:  ... on the line right after the previous match's
    PREFIX-SAME:  ... on the previous match's line, after it
    PREFIX-NOT:   the pattern does not occur between the previous match and the next
                  one (or the end of the output, after the last)

Why not the `filecheck` package: these four directives over in-memory text are a few dozen
lines, and a dependency would be a subprocess and a file per check.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Directive:
    kind: str        # '' | 'NEXT' | 'SAME' | 'NOT'
    pattern: str
    line: int        # in the test file, for messages


def directives(text: str, prefix: str = "CHECK") -> list[Directive]:
    rx = re.compile(rf"^\s*#\s*{re.escape(prefix)}(?:-(NEXT|SAME|NOT))?:(.*)$")
    return [Directive(m.group(1) or "", m.group(2).strip(), k)
            for k, line in enumerate(text.splitlines(), 1) if (m := rx.match(line))]


def _regex(pattern: str) -> re.Pattern:
    parts = re.split(r"\{\{(.*?)\}\}", pattern)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?:{p})"
                              for i, p in enumerate(parts)))


def filecheck(output: str, checks: list[Directive], *, where: str = "checks") -> None:
    """Raise AssertionError (naming the directive and showing the output) unless `output`
    satisfies `checks`."""
    lines = output.splitlines()
    row, col, started = 0, 0, False      # the previous match ended at lines[row][col]
    nots: list[Directive] = []

    def fail(d: Directive, why: str, at: int):
        shown = "\n".join(f"{'>' if k == at else ' '}{k + 1:4d} {s}"
                          for k, s in enumerate(lines))
        raise AssertionError(f"{where}:{d.line}: {d.kind or 'CHECK'} {d.pattern!r}: {why}\n"
                             f"output:\n{shown}")

    def forbid(end_row: int, end_col: int | None):
        for d in nots:
            rx = _regex(d.pattern)
            for r in range(row, min(end_row, len(lines) - 1) + 1):
                seg = lines[r][(col if r == row else 0):(end_col if r == end_row else None)]
                if rx.search(seg):
                    fail(d, "found where it must not be", r)
        nots.clear()

    for d in checks:
        if d.kind == "NOT":
            nots.append(d)
            continue
        if d.kind in ("NEXT", "SAME") and not started:
            fail(d, "has no previous match to follow", row)
        rx = _regex(d.pattern)
        rows = {"NEXT": [row + 1], "SAME": [row]}.get(d.kind, range(row, len(lines)))
        hit = None
        for r in rows:
            if r < len(lines):
                m = rx.search(lines[r], col if r == row and started else 0)
                if m:
                    hit = (r, m)
                    break
        if hit is None:
            where_ = {"NEXT": "on the next line", "SAME": "on the same line"}
            fail(d, f"not found {where_.get(d.kind, 'after the previous match')}", row)
        forbid(hit[0], hit[1].start())
        row, col, started = hit[0], hit[1].end(), True
    forbid(len(lines) - 1, None)
