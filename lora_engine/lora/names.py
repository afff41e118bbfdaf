"""Module names matched against a regular expression without backtracking: PEFT's semantics, bounded time.

PEFT matches a string `target_modules` with `re.fullmatch(pattern, name)` and the keys of rank_pattern /
alpha_pattern with `re.match(rf"(.*\\.)?({key})$", name)`. Python's `re` backtracks, so a pattern from an
adapter file such as `(.*.*.*.*.*.*.*.*)*z` takes hours on one module name. Here the pattern is parsed
by Python's own regex parser (so it means exactly what `re` would make of it) and run as a set of
positions: for each part of the pattern and each start position, the set of end positions is computed
once and remembered. That is at most (pattern parts) x (name length)^2 steps, whatever the pattern, and
a pattern that needs over MAX_STEPS for a model's names is refused rather than run.

The regular subset is supported: literals, `.`, classes, `|`, groups, every repeat, `^`, `$`, `\\A`,
`\\Z`, `\\b`, `\\B`. Backreferences, lookarounds, conditionals, possessive repeats, atomic groups and
flags (`(?i)`) are refused with PatternError: module-name patterns have no use for them.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from re import _constants as C
    from re import _parser as sre_parse
else:  # pragma: no cover - the same modules under their old names
    import sre_constants as C
    import sre_parse

MAX_PATTERN = 2000  # characters: a module-name pattern is a line, not a program
MAX_REPEAT_COUNT = 10_000  # explicit {m,n} bounds; a module name is far shorter
# Steps for all the names of a model: an ordinary pattern takes a few hundred per module path (~1 us each);
# `(.*.*.*.*.*.*.*.*)*z` takes ~8000 per path, so on a model of hundreds of modules it is refused in ~1 s.
MAX_STEPS = 500_000


class PatternError(ValueError):
    """A pattern that is not a valid regular expression or uses what the bounded matcher refuses."""


def compile_pattern(pattern: str):
    """The parsed pattern, checked; PatternError (naming the pattern) when invalid or unsupported."""
    if not isinstance(pattern, str):
        raise PatternError(f"a module pattern must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"module pattern of {len(pattern)} characters is too long (limit {MAX_PATTERN})")
    try:
        parsed = sre_parse.parse(pattern)
    except C.error as e:
        raise PatternError(f"{pattern!r:.80} is not a valid regular expression: {e}") from e
    except (RecursionError, OverflowError) as e:
        raise PatternError(f"{pattern!r:.80} is nested too deeply or counts too high: {e}") from e
    if parsed.state.flags & ~(C.SRE_FLAG_UNICODE | C.SRE_FLAG_DOTALL):
        raise PatternError(f"{pattern!r:.80}: flags such as (?i) are not supported in module patterns")
    try:
        _check(parsed, pattern)
    except RecursionError:
        raise PatternError(f"{pattern!r:.80} is nested too deeply") from None
    return parsed


def _check(seq, pattern: str) -> None:
    for op, av in seq:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN, C.AT):
            continue
        if op is C.BRANCH:
            for alt in av[1]:
                _check(alt, pattern)
        elif op is C.SUBPATTERN:
            if av[1] or av[2]:
                raise PatternError(f"{pattern!r:.80}: flags such as (?i:...) are not supported in module patterns")
            _check(av[3], pattern)
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, body = av
            if lo > MAX_REPEAT_COUNT or (hi != C.MAXREPEAT and hi > MAX_REPEAT_COUNT):
                raise PatternError(f"{pattern!r:.80}: a repeat count over {MAX_REPEAT_COUNT}")
            _check(body, pattern)
        else:
            raise PatternError(f"{pattern!r:.80}: {str(op).lower()} (backreferences, lookarounds, possessive or "
                               "atomic groups) is not supported in module patterns")


def fullmatch(pattern, name: str) -> bool:
    """re.fullmatch(pattern, name) is not None, in bounded time. `pattern`: a string or compile_pattern's result."""
    return bool(match_names(pattern, [name]))


def match_names(pattern, names) -> list[str]:
    """The names that `pattern` fully matches (re.fullmatch), in order; at most MAX_STEPS steps for all of them
    together, else PatternError."""
    parsed = compile_pattern(pattern) if isinstance(pattern, str) else pattern
    dotall = bool(parsed.state.flags & C.SRE_FLAG_DOTALL)
    budget = [MAX_STEPS]
    return [n for n in names if _Run(n, dotall, getattr(parsed.state, "str", ""), budget).seq(parsed, 0) >> len(n) & 1]


class _Run:
    """One name against one pattern. A set of positions is an int, bit p set for position p; the end
    positions of each (pattern part, start) are computed once."""

    def __init__(self, s: str, dotall: bool, pattern: str, budget: list[int]):
        self.s, self.n, self.dotall, self.memo, self.pattern = s, len(s), dotall, {}, pattern
        self.budget = budget  # steps left, shared by the names of one match_names call

    def _spend(self) -> None:
        # On top of the polynomial bound: a pattern that would take seconds is refused, not run.
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise PatternError(f"module pattern {self.pattern!r:.80} takes over {MAX_STEPS} steps to match the "
                               "module names; simplify it, or list the module names instead")

    def seq(self, items, pos: int) -> int:
        key = (id(items), pos)
        if key not in self.memo:
            positions = 1 << pos
            for item in items:
                positions = self.each(item, positions)
                if not positions:
                    break
            self.memo[key] = positions
        return self.memo[key]

    def each(self, item, positions: int) -> int:
        """Union of the ends of `item` from every position in `positions`."""
        out = 0
        while positions:
            self._spend()
            low = positions & -positions
            out |= self.item(item, low.bit_length() - 1)
            positions ^= low
        return out

    def item(self, item, pos: int) -> int:
        key = (id(item), pos)
        if key not in self.memo:
            self.memo[key] = self._item(item, pos)
        return self.memo[key]

    def _item(self, item, pos: int) -> int:
        op, av = item
        s, n, one = self.s, self.n, 1 << (pos + 1)
        if op is C.LITERAL:
            return one if pos < n and ord(s[pos]) == av else 0
        if op is C.NOT_LITERAL:
            return one if pos < n and ord(s[pos]) != av else 0
        if op is C.ANY:
            return one if pos < n and (self.dotall or s[pos] != "\n") else 0
        if op is C.IN:
            return one if pos < n and _in_class(av, s[pos]) else 0
        if op is C.AT:
            return 1 << pos if self._at(av, pos) else 0
        if op is C.BRANCH:
            out = 0
            for alt in av[1]:
                out |= self.seq(alt, pos)
            return out
        if op is C.SUBPATTERN:
            return self.seq(av[3], pos)
        lo, hi, body = av  # MAX_REPEAT / MIN_REPEAT: greedy or lazy ends at the same places for a full match
        if len(body) == 1 and body[0][0] in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            # One character at a time (`.*`, `[a-z]+`): the run of matching characters from pos, directly.
            run = 0
            while run < hi and pos + run < n and self.item(body[0], pos + run):
                self._spend()
                run += 1
            return ((1 << (run - lo + 1)) - 1) << (pos + lo) if run >= lo else 0
        result, frontier, k = 0, 1 << pos, 0
        while frontier:
            if k >= lo:
                frontier &= ~result  # a position seen again has nothing new to add
                result |= frontier
            if k == hi or not frontier:
                break
            step = 0
            rest = frontier
            while rest:
                self._spend()
                low = rest & -rest
                step |= self.seq(body, low.bit_length() - 1)
                rest ^= low
            k = lo if k < lo and step == frontier else k + 1  # a fixed point: more repeats change nothing
            frontier = step
        return result

    def _at(self, where, pos: int) -> bool:
        s, n = self.s, self.n
        if where in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return pos == 0
        if where is C.AT_END:
            return pos == n or (pos == n - 1 and s[-1] == "\n")
        if where is C.AT_END_STRING:
            return pos == n
        word = [pos > 0 and _is_word(s[pos - 1]), pos < n and _is_word(s[pos])]
        if where in (C.AT_BOUNDARY, C.AT_UNI_BOUNDARY):
            return word[0] != word[1]
        if where in (C.AT_NON_BOUNDARY, C.AT_UNI_NON_BOUNDARY):
            return word[0] == word[1]
        raise PatternError(f"anchor {where} is not supported in module patterns")


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


_CATEGORIES = {
    C.CATEGORY_DIGIT: str.isdecimal, C.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    C.CATEGORY_SPACE: str.isspace, C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    C.CATEGORY_WORD: _is_word, C.CATEGORY_NOT_WORD: lambda c: not _is_word(c),
    C.CATEGORY_UNI_DIGIT: str.isdecimal, C.CATEGORY_UNI_NOT_DIGIT: lambda c: not c.isdecimal(),
    C.CATEGORY_UNI_SPACE: str.isspace, C.CATEGORY_UNI_NOT_SPACE: lambda c: not c.isspace(),
    C.CATEGORY_UNI_WORD: _is_word, C.CATEGORY_UNI_NOT_WORD: lambda c: not _is_word(c),
}


def _in_class(items, c: str) -> bool:
    negate, hit = False, False
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            hit = hit or ord(c) == av
        elif op is C.NOT_LITERAL:
            hit = hit or ord(c) != av
        elif op is C.RANGE:
            hit = hit or av[0] <= ord(c) <= av[1]
        elif op is C.CATEGORY:
            if av not in _CATEGORIES:
                raise PatternError(f"character category {av} is not supported in module patterns")
            hit = hit or _CATEGORIES[av](c)
        else:
            raise PatternError(f"{op} in a character class is not supported in module patterns")
    return hit != negate
