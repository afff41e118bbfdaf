"""Chat templates, which come with a checkpoint and so are untrusted programs: compiled and rendered in a sandbox.

The sandbox is jinja2's ImmutableSandboxedEnvironment (no attribute tricks, no mutation of lists and
dicts, `range` capped at 100000 items) with the globals and settings transformers gives templates
(raise_exception, strftime_now, a JSON `tojson`, trim_blocks and lstrip_blocks), plus limits on size
that jinja2 lacks: `'a' * 10**11` would otherwise ask for 100 GB. Every value an operator (`*`, `+`,
`~`, `**`, `%`), a filter or a method call makes is measured before it is made where that is cheap
(repetition, joins, numbers in format specs, int arguments) and after otherwise; the rendered text
is accumulated piece by piece and capped too. Python's recursion limit bounds recursive macros.
The time of one render is bounded as well (MAX_SECONDS): every loop iteration, call, filter, operator
and attribute lookup checks the clock, so nested `range(100000)` loops (10^10 iterations, each within
every size limit) stop there. Only a clock bounds all work alike: a count of steps would let one step
be a 10M-item filter. Real templates render in milliseconds.
Whatever a template raises, it raises as ChatTemplateError, naming the checkpoint.

Templates may mark what the model writes with `{% generation %}...{% endgeneration %}` (transformers'
AssistantTracker tag, used with `return_assistant_tokens_mask`; TRL's training templates have them). The tag
renders its body unchanged; `render(..., generation_spans=[])` also records where each block lands in the text.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lora_engine.io.safetensors import CheckpointError

# Characters (or items, for lists) one value may hold, and the rendered text as a whole: far above what
# a conversation renders to (a 128k-token context is ~0.5M characters), far below what exhausts memory.
MAX_SIZE = 10_000_000
MAX_INT_BITS = 4096  # integers: a template counts and indexes, it has no use for huge numbers
MAX_SECONDS = 1.0  # one render; a real template takes milliseconds, even on a long conversation


class ChatTemplateError(CheckpointError):
    """A checkpoint's chat template cannot be compiled or rendered: refused by the sandbox, over a limit,
    broken, or stopped by its own raise_exception. The message names the checkpoint."""


class _Limit(jinja2.TemplateError):
    """A value over the sandbox's size limits (raised inside a render, reported as ChatTemplateError)."""


def _size(value, budget: int = MAX_SIZE) -> int:
    """Characters of strings plus one per item, walking containers; stops counting past `budget`
    (shared sub-lists are counted each time they appear, as rendering would write them)."""
    total, stack = 0, [value]
    while stack and total <= budget:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += len(v)
            stack += v
        elif isinstance(v, dict):
            total += len(v)
            stack += [*v.keys(), *v.values()]
        else:
            total += 1
    return total


def _check(value, what: str):
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _Limit(f"{what} makes an integer of {value.bit_length()} bits (limit {MAX_INT_BITS})")
    if isinstance(value, (str, list, tuple, dict)) and _size(value) > MAX_SIZE:
        raise _Limit(f"{what} makes a value of over {MAX_SIZE} characters or items")
    return value


def _check_args(args, kwargs, what: str) -> None:
    """Before a call: an int argument (a width, a count) or a number in a format string over the limit is refused,
    and so is a join whose pieces add up to more than it."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_SIZE:
            raise _Limit(f"{what} is given {a}, over the limit of {MAX_SIZE}")
        if isinstance(a, str) and any(int(n) > MAX_SIZE for n in re.findall(r"\d{8,}", a)):
            raise _Limit(f"{what} is given a format with a width over the limit of {MAX_SIZE}")


def _guard(fn, name: str, env: LimitedSandbox):
    def guarded(*args, **kwargs):
        env.tick()
        _check_args(args, kwargs, f"the filter {name}")
        if name in GROWING:
            _check_bound(_growth((*args, *kwargs.values())), f"the filter {name}")
        return _check(fn(*args, **kwargs), f"the filter {name}")

    if hasattr(fn, "jinja_pass_arg"):  # jinja2's pass_context / pass_environment marker: keep what it passes
        guarded.jinja_pass_arg = fn.jinja_pass_arg
    return guarded


# Filters and str methods whose result can outgrow every argument (a join of a list with a long separator,
# an indent of many lines): their result is bounded before the call by _growth.
GROWING = ("join", "replace", "indent", "wordwrap", "center", "ljust", "rjust", "zfill", "expandtabs")


def _growth(values) -> int:
    """An upper bound of what a growing call makes: the size of its first value (the text, the list) times
    that of the largest other (separator, replacement, width). Arguments that are no data (jinja2's
    context objects) do not count."""
    sizes = [abs(v) if isinstance(v, int) else _size(v) for v in values
             if isinstance(v, (str, list, tuple, dict)) or (isinstance(v, int) and not isinstance(v, bool))]
    return sizes[0] * max([1, *sizes[1:]]) if sizes else 0


def _check_bound(n: int, what: str) -> None:
    if n > MAX_SIZE:
        raise _Limit(f"{what} would make a value of up to {n} characters or items (limit {MAX_SIZE})")


class _LimitedCode(CodeGenerator):
    """What the sandbox does not intercept: `a ~ b` compiles to a join (its result is checked as well), and a
    for loop iterates in plain Python (its iterable becomes environment.counted(iterable), which checks the
    render's clock at each item)."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(", '~')")

    def visit_For(self, node, frame) -> None:
        if not _is_counted(node.iter):
            node.iter = nodes.Call(nodes.EnvironmentAttribute("counted"), [node.iter], [], None, None,
                                   lineno=node.lineno)
        super().visit_For(node, frame)


def _is_counted(node) -> bool:
    return isinstance(node, nodes.Call) and isinstance(node.node, nodes.EnvironmentAttribute) and \
        node.node.name == "counted"


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with limits on the size of the values a template makes and on the time
    one render takes (see `limited_time`)."""

    code_generator_class = _LimitedCode
    intercepted_binops = frozenset({"*", "+", "**", "%", "//"})

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.filters = {name: _guard(f, name, self) for name, f in self.filters.items()}
        self._render = threading.local()  # the running render's deadline and tracking, per thread: templates are shared

    @contextlib.contextmanager
    def limited_time(self, seconds: float = MAX_SECONDS):
        """Within: each step of a render (loop iteration, call, filter, operator, lookup) past `seconds` raises."""
        self._render.deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self._render.deadline = None

    def tick(self) -> None:
        deadline = getattr(self._render, "deadline", None)  # None outside a render: constant folding at compile time
        if deadline is not None and time.monotonic() > deadline:
            raise _Limit(f"rendering takes over {MAX_SECONDS:g} s (a loop too long, or loops inside loops)")

    def counted(self, iterable):
        for item in iterable:
            self.tick()
            yield item

    def checked(self, value, what: str):
        return _check(value, f"the operator {what}")

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator: str, left, right):
        self.tick()
        what = f"the operator {operator}"
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                _check_bound(_size(seq) * max(n, 0), what)
            elif isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Limit(f"{what} would make an integer of over {MAX_INT_BITS} bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            _check_bound(_size(left) + _size(right), what)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right > MAX_INT_BITS or right * left.bit_length() > MAX_INT_BITS:
                raise _Limit(f"{what} would make an integer of over {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_args((left, *(right if isinstance(right, tuple) else (right,))), {}, what)
        return _check(super().call_binop(context, operator, left, right), what)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        name = getattr(__obj, "__name__", type(__obj).__name__)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the str of 'x'.join, 'x'.format
        what = f"calling {name}"
        __self.tick()
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive for: iterated like the first
            args = (__self.counted(args[0]), *args[1:])
        _check_args((owner, *args) if name in ("format", "format_map") else args, kwargs, what)
        if name in GROWING:
            _check_bound(_growth((owner, *args, *kwargs.values())), what)
        return _check(super().call(__context, __obj, *args, **kwargs), what)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the body as written; while `render` tracks (its
    generation_spans), each block's (start, end, text), the offsets counted as transformers counts them: the
    length of all the text the render has yielded before the block's own."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

    def _block(self, caller) -> str:
        text = caller()
        tracking = getattr(self.environment._render, "generation", None)  # (pieces so far, spans) or None
        if tracking is not None:
            pieces, spans = tracking
            start = sum(map(len, pieces))
            spans.append((start, start + len(text), text))
        return text


def compile_template(source: str, name_or_path: str) -> jinja2.Template:
    """The template compiled in the limited sandbox; ChatTemplateError when it is not valid Jinja."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the rendered text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _guard(tojson, "tojson", env)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template of {name_or_path} is not valid Jinja (line {e.lineno}): {e.message}"
        ) from e
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as e:  # e.g. nesting too deep to parse
        raise ChatTemplateError(f"the chat template of {name_or_path} cannot be compiled: {e}") from e


def render(template: jinja2.Template, name_or_path: str, generation_spans: list | None = None, **context) -> str:
    """Render with the output capped at MAX_SIZE characters and the time at MAX_SECONDS; any failure is a
    ChatTemplateError. A list given as `generation_spans` receives the (start, end) character offsets of each
    `{% generation %}` block in the text, in order."""
    pieces, size, tracked = [], 0, []
    env = template.environment
    try:
        env._render.generation = (pieces, tracked) if generation_spans is not None else None
        with env.limited_time():
            for piece in template.generate(**context):
                size += len(piece)
                if size > MAX_SIZE:
                    raise _Limit(f"the rendered text passes {MAX_SIZE} characters")
                pieces.append(piece)
    # The template is a program from the checkpoint: whatever it raises (the sandbox's SecurityError, a
    # limit, its own raise_exception, a TypeError from `1 + 'a'`, RecursionError from a recursive macro)
    # is that file's failure, not the engine's.
    except Exception as e:
        raise ChatTemplateError(f"the chat template of {name_or_path} failed: {e or type(e).__name__}") from e
    finally:
        env._render.generation = None
    text = "".join(pieces)
    for start, end, block in tracked:
        # A block whose text is not written when it is made (a macro's, joined with other text before it is
        # written; a {% set %} block's) is counted at the wrong place: its offsets would point at other text, where
        # transformers' mask would silently be wrong.
        if text[start:end] != block:
            raise ChatTemplateError(f"the chat template of {name_or_path} has a {{% generation %}} block whose text "
                                    "is not written where it is made (inside a macro or a set block), so where it "
                                    "lands is unknown; put the block in the template's loop over messages")
    if generation_spans is not None:
        generation_spans += [(start, end) for start, end, _ in tracked]
    return text
