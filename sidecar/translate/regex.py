"""Regular expressions in routes as Envoy Gateway takes them and Envoy runs them: RE2 syntax, not Python's.

EG checks a match's regex with Go's `regexp` and Envoy compiles it with RE2; both speak RE2's syntax. Python's
`re` differs both ways: it accepts lookarounds, backreferences, `\\Z`, possessive quantifiers and atomic groups,
which RE2 refuses (Envoy would refuse the whole config), and it refuses `\\p{L}`, `\\z` and flags such as `(?i)`
after the start, which EG and Envoy take. So the check here is RE2 itself, plus what RE2 takes and Go's `regexp`
does not (`_go_refusal`). What Go takes and RE2 refuses (Go 1.25's long Unicode class names such as `\\p{Letter}`,
a pattern past RE2's memory limit) EG would send on, and Envoy would refuse the whole config: here the rule is left
out instead.

Envoy also refuses a regex whose compiled RE2 program is larger than its runtime's
`re2.max_program_size.error_level` (100 by default, which `^/users/[a-z0-9-]{1,64}$` exceeds). EG's bootstrap
lifts that level; `ENVOY_RUNTIME` is the same runtime layer for the bootstraps rendered here.
"""

from __future__ import annotations

import re

import re2  # google-re2: the same engine as Envoy's

__all__ = ["ENVOY_RUNTIME", "regex_error"]

#: EG's bootstrap runtime layer: no error past any RE2 program size, a warning in Envoy's log past 1000.
ENVOY_RUNTIME = {
    "layers": [
        {
            "name": "global_config",
            "static_layer": {"re2.max_program_size.error_level": 4294967295, "re2.max_program_size.warn_level": 1000},
        }
    ]
}

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would also print each refusal to stderr


def regex_error(pattern: str) -> str | None:
    """Why EG refuses `pattern` (Go's `regexp`, RE2 syntax), or None when it compiles."""
    try:
        re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "does not compile"
        return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    return _go_refusal(pattern)


#: Go's regexp/syntax limit on nesting (its parse tree's height: CVE-2022-24921); RE2 has none.
MAX_NESTING = 1000
_NAMED_GROUP = re.compile(r"\(\?P?<(?![=!])([^>]*)>")
_GO_CAPTURE_NAME = re.compile(r"[A-Za-z0-9_]+")


def _go_refusal(pattern: str) -> str | None:
    """What Go's `regexp` refuses in a pattern RE2 compiles: the any-byte escape `\\C`; a capture name that is not
    ASCII letters, digits and `_`; capturing groups nested MAX_NESTING deep (Go's tree height counts repetitions
    too, so a pattern just under that can still pass here where Go refuses it). Escapes, `\\Q...\\E` literals and
    character classes are skipped."""
    i, depth, in_class = 0, 0, False
    groups: list[bool] = []  # per open group: whether it captures (only capturing groups are nodes of Go's tree)
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            following = pattern[i + 1 : i + 2]
            if following == "Q" and not in_class:  # literal text up to \E, or to the end
                end = pattern.find("\\E", i + 2)
                i = len(pattern) if end < 0 else end + 2
                continue
            if following == "C":
                return r"invalid escape sequence: \C (Go's regexp has no any-byte escape)"
            i += 2
        elif in_class:
            if char == "]":
                in_class = False
            elif pattern.startswith("[:", i) and (end := pattern.find(":]", i + 2)) >= 0:
                i = end + 1  # a POSIX class: its ']' does not end the outer one
            i += 1
        elif char == "[":
            i += 1
            i += pattern.startswith("^", i)
            i += pattern.startswith("]", i)  # a ']' first is a literal
            in_class = True
        else:
            if char == "(":
                named = _NAMED_GROUP.match(pattern, i)
                if named and not _GO_CAPTURE_NAME.fullmatch(named.group(1)):
                    return f"invalid named capture: {named.group(0)} (Go takes ASCII letters, digits and _)"
                captures = named is not None or not pattern.startswith("(?", i)
                groups.append(captures)
                depth += captures
                if depth >= MAX_NESTING:  # the tree is one higher than the captures around its innermost node
                    return f"expression nests too deeply (Go's regexp allows a tree {MAX_NESTING} high)"
            elif char == ")" and groups:
                depth -= groups.pop()
            i += 1
    return None
