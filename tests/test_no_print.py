"""Library code speaks through `logging`: an AST walk of every module of the package.

A `print(...)` call or a `sys.stdout` / `sys.stderr` reference is allowed only where a command
line talks to its user: inside a module-level function named `main` (the entry point of
`python -m lora_engine.<cmd>`) and in the modules that are command-line machinery only.
"""

from __future__ import annotations

import ast

from tests.test_layers import MODULES, ROOT

CLI_MODULES = {"lora_engine.cli", "lora_engine.train.command", "lora_engine.registry.command"}  # registry: its subcommands' output


def console_writes(source: str, filename: str = "<probe>") -> list[tuple[int, str]]:
    """(line, what) for each print call and sys.stdout / sys.stderr use outside a module-level main()."""
    tree = ast.parse(source, filename)
    found = []

    def visit(node, in_main):
        for child in ast.iter_child_nodes(node):
            inside = in_main or (node is tree and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                                 and child.name == "main")
            if not inside:
                if isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == "print":
                    found.append((child.lineno, "print()"))
                elif (isinstance(child, ast.Attribute) and child.attr in ("stdout", "stderr")
                      and isinstance(child.value, ast.Name) and child.value.id == "sys"):
                    found.append((child.lineno, f"sys.{child.attr}"))
            visit(child, inside)

    visit(tree, False)
    return found


def test_library_modules_do_not_print():
    bad = []
    for mod, path in MODULES.items():
        if mod in CLI_MODULES:
            continue
        for line, what in console_writes(path.read_text(encoding="utf-8"), str(path)):
            bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {what}")
    assert not bad, ("library code writes to the console; use logging.getLogger(__name__), or move it into "
                     "the command's main():\n" + "\n".join(bad))


def test_the_walker_finds_prints_outside_main_only():
    source = '''
import sys

def helper():
    print("x")                      # flagged
    sys.stderr.write("y")           # flagged

class C:
    def main(self):
        print("a method is not the entry point")   # flagged

def main(argv=None):
    print("the command's output")   # allowed
    def show(piece):
        sys.stdout.write(piece)     # allowed: inside main
    show("z")
'''
    assert console_writes(source) == [(5, "print()"), (6, "sys.stderr"), (10, "print()")]
