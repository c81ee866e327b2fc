"""Target patterns in a restricted regular-expression syntax: matching a name can never take exponential time.

Python's `re` backtracks, so a pattern such as `(a+)+b`, `(\\w*)*x` or `(a|a)*b`
takes time exponential in the length of the name it fails on: a
`factorize.targets` of that shape hung the fisher stage. Such a pattern needs a
repetition (or an alternation) inside a repetition, or a backreference; none
is needed to pick layers by name, so they are refused, by key, when the
params are loaded. Parsing uses the `re` module's own parser.
"""

from __future__ import annotations

import re

from lowrank.config.base import ConfigError

try:  # the parser `re.compile` itself uses (its module was `sre_parse` before Python 3.11)
    from re import _constants as _c, _parser as _p
except ImportError:  # pragma: no cover  Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}


def _problem(items, inside_repeat: bool) -> str | None:
    for op, arg in items:
        if op in _REPEATS:
            low, high, body = arg
            if inside_repeat and high > 1:
                return "a repetition inside a repetition (like (a+)+)"
            if found := _problem(body, inside_repeat or high > 1):
                return found
        elif op is _c.BRANCH:
            if inside_repeat:
                return "an alternation inside a repetition (like (a|ab)*)"
            for branch in arg[1]:
                if found := _problem(branch, inside_repeat):
                    return found
        elif op is _c.SUBPATTERN:
            if found := _problem(arg[-1], inside_repeat):
                return found
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            if found := _problem(arg[1], inside_repeat):
                return found
        elif op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            return "a backreference"
    return None


def check_pattern(pattern: str, key: str) -> None:
    """ConfigError naming `key` unless `pattern` is a regular expression in the restricted syntax."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{key}: a pattern of {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")
    try:
        re.compile(pattern)
        parsed = _p.parse(pattern)
    except re.error as err:
        raise ConfigError(f"{key}: not a regular expression: {err}") from None
    if problem := _problem(parsed, False):
        raise ConfigError(
            f"{key}: {pattern!r} has {problem}, which can take exponential time to match; "
            "write it without one, or give a list of names"
        )
