"""Regular expressions in routes as Envoy Gateway takes them and Envoy runs them: RE2 syntax, not Python's.

EG checks a match's regex with Go's `regexp` and Envoy compiles it with RE2; both speak RE2's syntax. Python's
`re` differs both ways: it accepts lookarounds, backreferences, `\\Z`, possessive quantifiers and atomic groups,
which RE2 refuses (Envoy would refuse the whole config), and it refuses `\\p{L}`, `\\z` and flags such as `(?i)`
after the start, which EG and Envoy take. So the check here is RE2 itself, plus the one escape RE2 takes and
Go's `regexp` does not (`\\C`, any byte).

Envoy also refuses a regex whose compiled RE2 program is larger than its runtime's
`re2.max_program_size.error_level` (100 by default, which `^/users/[a-z0-9-]{1,64}$` exceeds). EG's bootstrap
lifts that level; `ENVOY_RUNTIME` is the same runtime layer for the bootstraps rendered here.
"""

from __future__ import annotations

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
    if _any_byte_escape(pattern):
        return r"invalid escape sequence: \C (Go's regexp has no any-byte escape)"
    return None


def _any_byte_escape(pattern: str) -> bool:
    r"""Whether `pattern` uses `\C` as an escape (not an escaped backslash before a C, nor inside `\Q...\E`)."""
    i, quoted = 0, False
    while i < len(pattern):
        if pattern.startswith(r"\E", i) and quoted:
            quoted, i = False, i + 2
        elif quoted:
            i += 1
        elif pattern.startswith(r"\Q", i):
            quoted, i = True, i + 2
        elif pattern[i] == "\\":
            if pattern.startswith("C", i + 1):
                return True
            i += 2
        else:
            i += 1
    return False
