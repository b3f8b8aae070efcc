"""A static check of workflow bodies for what breaks determinism (``substantial lint``).

A workflow's body runs again from the top on every replay, so whatever it reads
outside a durable call must read the same every time (docs/concepts/determinism.md).
The run-time check compares only the durable calls themselves; it cannot see a
clock read that changes a branch, or a ``while time.time() < deadline:`` loop that
runs another number of times. This module reads the source with :mod:`ast` (it
never imports or runs it) and flags, in each workflow body, the calls whose
value or effect differs between executions, each with the durable alternative.

What is a workflow body: the body of a function decorated with ``@workflow``,
``@workflow(...)``, ``@substantial.workflow(...)`` or any decorator whose final
name is ``workflow``, including the helper functions defined in it. What is
not: the callables given to ``save`` (its first argument, a lambda or a function
passed by name, and ``compensate_with=``), which run once and are recorded, and
helpers used only from them. Import aliases (``import time as t``, ``from random
import randint``) are resolved from the imports the code can see.

Codes (stable: documented in docs/reference/cli.md)::

    SUB001  the clock: time.time/time_ns/monotonic/perf_counter, datetime.now/utcnow/today,
            date.today                                       -> await c.now()
    SUB002  randomness: random.*, secrets.*, os.urandom     -> await c.random()
    SUB003  new ids: uuid.uuid1, uuid.uuid4                 -> await c.uuid4()
    SUB004  the environment: os.environ, os.getenv          -> workflow kwargs
    SUB005  file, network and process I/O: open, pathlib.Path I/O methods, socket, requests,
            httpx, aiohttp, urllib.request, subprocess, os.system -> c.save(...)
    SUB006  asyncio.sleep                                   -> await c.sleep(...)
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import sys
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

from .errors import SubstantialError

__all__ = ["CODES", "Finding", "LintError", "lint_paths", "lint_source"]


class LintError(SubstantialError):
    """An input the lint cannot read: a missing path or module, a syntax error."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One construct in a workflow body that breaks determinism, and what to use instead."""

    path: str
    line: int  # 1-based
    col: int  # 1-based, as editors and other linters count
    code: str
    message: str
    alternative: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.col}"
        return f"{where}: {self.code} {self.message} — use {self.alternative}"


@dataclass(frozen=True, slots=True)
class _Rule:
    code: str
    why: str  # follows the construct's name in the message
    alternative: str


_CLOCK = _Rule("SUB001", "reads the clock: a replay sees another time", "await c.now()")
_RANDOM = _Rule(
    "SUB002",
    "is random: a replay draws another value",
    "await c.random(), or a value computed inside c.save(...)",
)
_UUID = _Rule("SUB003", "makes a new id on every replay", "await c.uuid4()")
_ENVIRONMENT = _Rule(
    "SUB004",
    "reads the environment, which may differ on the worker that replays",
    "workflow kwargs, or read it inside c.save(...)",
)
_IO = _Rule("SUB005", "does I/O, again on every replay", "c.save(...) around it")
_SLEEP = _Rule(
    "SUB006",
    "is not a durable timer: the wait is lost when the worker stops",
    "await c.sleep(...)",
)

CODES: dict[str, str] = {
    r.code: r.alternative for r in (_CLOCK, _RANDOM, _UUID, _ENVIRONMENT, _IO, _SLEEP)
}
"""Each code and its durable alternative."""

_PATH = "pathlib.Path()"  # the resolved name of a Path instance
_PATH_IO = (
    *("open", "read_text", "write_text", "read_bytes", "write_bytes", "exists", "is_file"),
    *("is_dir", "iterdir", "glob", "rglob", "stat", "mkdir", "touch", "unlink", "rmdir"),
    *("rename", "replace"),
)
_CLOCK_NAMES = (
    *("time.time", "time.time_ns", "time.monotonic", "time.monotonic_ns"),
    *("time.perf_counter", "time.perf_counter_ns", "datetime.datetime.now"),
    *("datetime.datetime.utcnow", "datetime.datetime.today", "datetime.date.today"),
)
_IO_NAMES = (
    *("builtins.open", "io.open", "os.open", "os.system", "os.popen"),
    *("asyncio.open_connection", "asyncio.create_subprocess_exec"),
    "asyncio.create_subprocess_shell",
    *(f"{_PATH}.{method}" for method in _PATH_IO),
)

# Flagged wherever they are referenced (called or passed around), by qualified name.
_NAMES: dict[str, _Rule] = {
    **dict.fromkeys(_CLOCK_NAMES, _CLOCK),
    # ``datetime.now()`` with ``datetime`` bound nowhere: the class, not the module
    **dict.fromkeys(("datetime.now", "datetime.utcnow", "datetime.today"), _CLOCK),
    "os.urandom": _RANDOM,
    "uuid.uuid1": _UUID,
    "uuid.uuid4": _UUID,
    **dict.fromkeys(("os.environ", "os.environb", "os.getenv", "os.getenvb"), _ENVIRONMENT),
    **dict.fromkeys(_IO_NAMES, _IO),
    "asyncio.sleep": _SLEEP,
}
# Every attribute of these modules is flagged when referenced.
_RANDOM_MODULES = {"random": _RANDOM, "secrets": _RANDOM}
# Calls into these modules are flagged; their other names (exception types, constants
# such as subprocess.PIPE) are fine in a workflow body, e.g. in an ``except`` clause.
_IO_MODULES = dict.fromkeys(
    ("socket", "requests", "httpx", "aiohttp", "urllib.request", "subprocess"), _IO
)
# A name bound nowhere, as in a snippet without its imports: what it most likely is.
_UNBOUND = {
    **{m: m for m in ("time", "datetime", "random", "secrets", "uuid", "os", "io", "asyncio")},
    **{m: m for m in ("socket", "requests", "httpx", "aiohttp", "urllib", "subprocess")},
    "date": "datetime.date",
    "Path": "pathlib.Path",
    "open": "builtins.open",
}
# Calls that return a Path, so that ``(Path(d) / "x").read_text()`` is I/O too.
_PATH_MAKERS = {
    *("pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath"),
    *("pathlib.Path.cwd", "pathlib.Path.home"),
    *(f"{_PATH}.{m}" for m in ("joinpath", "with_name", "with_stem", "with_suffix")),
    *(f"{_PATH}.{m}" for m in ("resolve", "absolute", "expanduser")),
}

# A scope maps a name to what it is bound to: a qualified name (imports), None (a
# local value the lint knows nothing about), or the expression assigned to it (kept
# to follow ``p = Path(...)`` to ``p.read_text()``).
_Binding = str | None | ast.expr
_Scope = dict[str, _Binding]
_Function = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


# -- entry points --------------------------------------------------------------------


def lint_source(source: str, filename: str) -> list[Finding]:
    """The findings in one module's source, in line order; ``filename`` is for the
    report only. A syntax error raises :class:`LintError` naming the line."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        where = f"{filename}:{exc.lineno}:{exc.offset}" if exc.lineno else filename
        raise LintError(f"{where}: syntax error: {exc.msg}") from None
    except ValueError as exc:  # e.g. a null byte
        raise LintError(f"{filename}: cannot parse: {exc}") from None
    found: set[Finding] = set()
    for fn, scopes in _workflows(tree, [_scope(tree)]):
        found.update(_Checker(filename, scopes, fn).run())
    return sorted(found, key=lambda f: (f.line, f.col, f.code))


def lint_paths(
    paths: Iterable[str | os.PathLike[str]], *, search_path: Sequence[str] | None = None
) -> list[Finding]:
    """The findings in every file named by ``paths``: a ``.py`` file, a directory (its
    ``*.py`` files, recursively, skipping hidden directories), or a dotted module name
    found on ``search_path`` (default: the current directory, then ``sys.path``) without
    importing it. A path or module that does not exist raises :class:`LintError`."""
    search = [os.getcwd(), *sys.path] if search_path is None else list(search_path)
    found: list[Finding] = []
    for file in _files(paths, search):
        found += lint_source(_read(file), _shown(file))
    return found


def _files(paths: Iterable[str | os.PathLike[str]], search: list[str]) -> Iterator[Path]:
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = _python_files(path)
        elif path.exists():
            found = [path]
        elif isinstance(given, str) and _is_module_name(given):
            found = _module_files(given, search)
        else:
            raise LintError(f"no such file or directory: {os.fspath(given)}")
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                yield file


def _is_module_name(given: str) -> bool:
    return not given.endswith(".py") and all(p.isidentifier() for p in given.split("."))


def _python_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*.py")
        if not any(
            part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts[:-1]
        )
    )


def _module_files(name: str, search: list[str]) -> list[Path]:
    """A module's source file, or a package's files, found as the import system would
    find them on ``search`` but without running any ``__init__``
    (``importlib.util.find_spec`` imports the parents of a dotted name)."""
    if name in sys.builtin_module_names:
        raise LintError(f"module {name} is built in: it has no Python source to check")
    parts = name.split(".")
    locations: Sequence[str] = search
    for depth in range(1, len(parts)):
        parent = _find_spec(".".join(parts[:depth]), locations, name)
        if parent.submodule_search_locations is None:
            raise LintError(f"no such module: {name} ({parent.name} is not a package)")
        locations = parent.submodule_search_locations
    spec = _find_spec(name, locations, name)
    if spec.submodule_search_locations:
        return [f for loc in spec.submodule_search_locations for f in _python_files(Path(loc))]
    if spec.origin and spec.origin.endswith(".py"):
        return [Path(spec.origin)]
    raise LintError(f"module {name} has no Python source to check ({spec.origin})")


def _find_spec(name: str, locations: Sequence[str], asked: str) -> ModuleSpec:
    spec = importlib.machinery.PathFinder.find_spec(name, locations)
    if spec is None:
        raise LintError(f"no such file, directory or module: {asked}")
    return spec


def _read(file: Path) -> str:
    try:
        with tokenize.open(file) as f:  # honours a coding cookie, as Python does
            return f.read()
    except SyntaxError as exc:  # a bad coding cookie
        raise LintError(f"{_shown(file)}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LintError(f"cannot read {_shown(file)}: {exc}") from None


def _shown(file: Path) -> str:
    """A path as the user would type it: relative to the current directory if inside."""
    try:
        return str(file.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(file)


# -- scopes --------------------------------------------------------------------------


def _is_workflow(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Name) and target.id == "workflow":
            return True
        if isinstance(target, ast.Attribute) and target.attr == "workflow":
            return True
    return False


def _workflows(
    node: ast.AST, scopes: list[_Scope]
) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, list[_Scope]]]:
    """Every workflow function, with the scopes its names resolve in (a workflow may
    be defined inside a function, e.g. in a test)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            if _is_workflow(child):
                yield child, scopes
            yield from _workflows(child, [*scopes, _scope(child)])
        else:
            yield from _workflows(child, scopes)


def _scope(node: ast.Module | _Function) -> _Scope:
    """The names a module or function binds, without entering nested scopes."""
    scope: _Scope = {}
    if not isinstance(node, ast.Module):
        a = node.args
        for arg in (*a.posonlyargs, *a.args, a.vararg, *a.kwonlyargs, a.kwarg):
            if arg is not None:
                scope[arg.arg] = None
    body = node.body if not isinstance(node, ast.Lambda) else []
    for stmt in body:
        _bind(stmt, scope)
    return scope


def _bind(node: ast.AST, scope: _Scope) -> None:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.asname:
                scope[alias.asname] = alias.name
            else:  # ``import a.b`` binds ``a``
                top = alias.name.split(".")[0]
                scope[top] = top
        return
    if isinstance(node, ast.ImportFrom):
        for alias in node.names:
            bound = f"{node.module}.{alias.name}" if node.module and not node.level else None
            scope[alias.asname or alias.name] = bound
        return
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        scope[node.name] = None
        return
    if isinstance(node, ast.Lambda | ast.comprehension):
        return  # their own scopes (a comprehension's targets do not leak)
    if (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    ):
        scope[node.targets[0].id] = node.value
        _bind(node.value, scope)
        return
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
        scope[node.target.id] = node.value
        _bind(node.value, scope)
        return
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        scope[node.id] = None
    for child in ast.iter_child_nodes(node):
        _bind(child, scope)


# -- the check of one workflow ------------------------------------------------------


class _Checker(ast.NodeVisitor):
    """Visits one workflow body, skipping the save callables (see :func:`_effects`)."""

    def __init__(
        self, filename: str, scopes: list[_Scope], fn: ast.FunctionDef | ast.AsyncFunctionDef
    ) -> None:
        self.filename = filename
        self.scopes = [*scopes, _scope(fn)]
        self.fn = fn
        self.effects, self.passed = _effects(fn)
        self.calls: dict[int, ast.Call] = {}  # id(call.func) -> call
        self.in_while_test = 0
        self.found: list[Finding] = []

    def run(self) -> list[Finding]:
        for stmt in self.fn.body:
            self.visit(stmt)
        return self.found

    # scopes: nested functions, lambdas and comprehensions

    def _visit_function(self, node: _Function) -> None:
        decorators = [] if isinstance(node, ast.Lambda) else node.decorator_list
        for expr in (*decorators, *node.args.defaults, *node.args.kw_defaults):
            if expr is not None:  # evaluated where the function is defined
                self.visit(expr)
        if id(node) in self.effects:
            return  # runs inside save(): recorded once, not replayed
        self.scopes.append(_scope(node))
        for stmt in node.body if isinstance(node.body, list) else [node.body]:
            self.visit(stmt)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_function(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_function(node)

    def _visit_comprehension(
        self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp
    ) -> None:
        scope: _Scope = {}
        for gen in node.generators:
            _bind(gen.target, scope)
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _visit_comprehension

    # annotations are not evaluated at run time (or only once, at definition)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    def visit_While(self, node: ast.While) -> None:
        self.in_while_test += 1
        self.visit(node.test)
        self.in_while_test -= 1
        for stmt in (*node.body, *node.orelse):
            self.visit(stmt)

    def visit_Call(self, node: ast.Call) -> None:
        self.calls[id(node.func)] = node
        self.generic_visit(node)

    # the constructs themselves: a name or a dotted chain, checked at its outermost node

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and id(node) not in self.passed:
            self._check(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load) and id(node) not in self.passed:
            self._check(node)
        if not isinstance(node.value, ast.Name | ast.Attribute):
            self.visit(node.value)  # e.g. the Path(...) of Path(...).read_text

    def _check(self, node: ast.Name | ast.Attribute) -> None:
        name = self._resolve(node)
        if name is None:
            return
        call = self.calls.get(id(node))
        found = _rule(name, called=call is not None)
        if found is None:
            return
        rule, name = found
        called = call is not None and name == self._resolve(node)
        if called and name == "random.Random" and call is not None and (call.args or call.keywords):
            return  # a seeded generator draws the same numbers on every replay
        shown = name.replace(_PATH, "Path(...)").removeprefix("builtins.")
        shown += "()" if called else ""
        why = rule.why
        if self.in_while_test and rule is _CLOCK:
            why = (
                "in a while condition reads the clock: a replay loops another number of "
                "times, which the run-time determinism check cannot catch"
            )
        self.found.append(
            Finding(
                path=self.filename,
                line=node.lineno,
                col=node.col_offset + 1,
                code=rule.code,
                message=f"{shown} {why}",
                alternative=rule.alternative,
            )
        )

    # names

    def _resolve(self, node: ast.expr, depth: int = 0) -> str | None:
        """The qualified name an expression stands for (``t.time`` after ``import time
        as t`` is ``time.time``; ``Path(x)`` is a Path instance), or None."""
        if depth > 20:  # p = q; q = p
            return None
        if isinstance(node, ast.Name):
            return self._lookup(node.id, depth)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value, depth + 1)
            if base is None:
                return None
            return _PATH if base == _PATH and node.attr == "parent" else f"{base}.{node.attr}"
        if isinstance(node, ast.Call):
            return _PATH if self._resolve(node.func, depth + 1) in _PATH_MAKERS else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return _PATH if self._resolve(node.left, depth + 1) == _PATH else None
        return None

    def _lookup(self, name: str, depth: int) -> str | None:
        for scope in reversed(self.scopes):
            if name in scope:
                bound = scope[name]
                if isinstance(bound, ast.expr):  # follow a local Path only
                    return _PATH if self._resolve(bound, depth + 1) == _PATH else None
                return bound
        return _UNBOUND.get(name)


def _rule(name: str, *, called: bool) -> tuple[_Rule, str] | None:
    """The rule for a qualified name, and the part of it the rule names: ``os.environ``
    in ``os.environ.get``; the whole name for a module's function, ``random.choice``."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in _NAMES:
            return _NAMES[prefix], prefix
        if n == len(parts):
            continue  # a module itself (``random``) is not flagged, only its attributes
        if prefix in _RANDOM_MODULES:
            return _RANDOM_MODULES[prefix], name
        if called and prefix in _IO_MODULES:
            return _IO_MODULES[prefix], name
    return None


def _effects(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[set[int], set[int]]:
    """The code of ``fn`` that runs inside ``save``, not in the body: the lambdas given
    to ``save`` (first argument or ``compensate_with=``), and the nested functions
    used only there or passed to it by name. Also the references passed to ``save``
    as they are (``c.save(charge)``, ``c.save(time.time)``), which the body does not
    call. Returns (ids of the functions and lambdas, ids of the references)."""
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(fn):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    effects: set[int] = set()
    passed: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and _is_save(node):
            for arg in _save_callables(node):
                if isinstance(arg, ast.Lambda):
                    effects.add(id(arg))
                elif isinstance(arg, ast.Name | ast.Attribute):
                    passed.add(id(arg))

    defs: dict[str, list[ast.AST]] = {}
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            defs.setdefault(node.name, []).append(node)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            for target in node.targets:  # charge = lambda: ...; c.save(charge)
                if isinstance(target, ast.Name):
                    defs.setdefault(target.id, []).append(node.value)
    uses: dict[str, list[ast.Name]] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in defs:
            uses.setdefault(node.id, []).append(node)

    def inside(node: ast.AST, ids: set[int]) -> bool:
        while id(node) in parents:
            node = parents[id(node)]
            if id(node) in ids:
                return True
        return False

    changed = True
    while changed:  # a helper used only by an effect is an effect too
        changed = False
        for name, nodes in defs.items():
            for d in nodes:
                if id(d) in effects:
                    continue
                refs = [u for u in uses.get(name, []) if not inside(u, {id(d)})]
                if refs and all(id(u) in passed or inside(u, effects) for u in refs):
                    effects.add(id(d))
                    changed = True
    return effects, passed


def _is_save(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Attribute) and call.func.attr == "save"


def _save_callables(call: ast.Call) -> Iterator[ast.expr]:
    """``f`` and ``compensate_with`` of a save call; for ``functools.partial(f, ...)``,
    ``f`` (its other arguments are evaluated in the body)."""
    given = [*call.args[:1], *(k.value for k in call.keywords if k.arg in ("f", "compensate_with"))]
    for arg in given:
        if isinstance(arg, ast.Call) and _final_name(arg.func) == "partial" and arg.args:
            yield arg.args[0]
        else:
            yield arg


def _final_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None
