"""The house rules of issue 13, checked on the source with `ast` (nothing is imported but the schema).

1. The schema owns every stream's and array's name: no string literal outside gentrace/store/schema.py
   is a stream or group name ("grad") or starts with one and a "/" ("grad/", f"preds/{split}").
   Docstrings are prose and pass; so does a literal on a line whose comment says
   `layout: not a store name (<why>)` (a config section or a file format's key that happens to be "data").
2. No import cycle among gentrace modules, counting imports inside functions.
3. No module reaches into another's privates: no `from gentrace.x import _name`, no `x._name` on an
   imported gentrace module.

Each check lists every offender as `path:line: ...`, so one run names all that is left to fix.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from gentrace.store import schema

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gentrace"
SCHEMA_FILE = "gentrace/store/schema.py"
# A literal on a line with this comment is not a store name (e.g. the config section "data").
EXEMPT = "layout: not a store name"

STORE_NAMES = frozenset(
    [*schema.STREAMS, schema.DATA.name, schema.CHECKPOINT_GROUP, schema.stream_of(schema.DERIVED_MI_GROUP)]
)


def sources(root: Path = ROOT) -> dict[str, str]:
    """Every gentrace/**/*.py, by its path relative to the repository root."""
    return {
        path.relative_to(root).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted((root / PACKAGE).rglob("*.py"))
    }


# -- 1. store names --------------------------------------------------------------------------------
def is_store_name(text: str, names: frozenset[str] = STORE_NAMES) -> bool:
    """`text` is a stream or group name, or starts with one followed by "/"."""
    return text.split("/", 1)[0] in names


# The names arrays have inside their stream (`<stream>/step`, `grad/<tensor>/sum`, `acts/<layer>/bits`, ...).
ARRAY_LEAVES = frozenset(
    ["step", "epoch", "lr", "bits", "values", "n", "loss_sum", "mean", "max", *schema.GRAD.MOMENTS]
)


def is_array_leaf(text: str) -> bool:
    """`text` continues a path with an array's own name: "/step", "/sum", "/bits/..." (the text after a `{name}`)."""
    return text.startswith("/") and text[1:].split("/", 1)[0] in ARRAY_LEAVES


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _exempt_lines(source: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT and EXEMPT in tok.string}


def store_name_literals(path: str, source: str) -> list[str]:
    """`path:line: literal` for every string literal (or f-string's leading text) that spells a store name."""
    if path == SCHEMA_FILE:
        return []
    tree = ast.parse(source, path)
    skip, exempt = _docstrings(tree), _exempt_lines(source)
    inner: set[int] = set()  # the text parts of f-strings: only the leading one names a path
    literals: list[tuple[ast.expr, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inner.update(id(v) for v in node.values)
            if node.values and isinstance(node.values[0], ast.Constant) and isinstance(node.values[0].value, str):
                literals.append((node, node.values[0].value))
            # `f"{stream}/step"`: a path built from a name and an array's own name
            literals += [
                (node, v.value) for v in node.values[1:] if isinstance(v, ast.Constant) and is_array_leaf(v.value)
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            literals.append((node, node.value))
    found = []
    for node, text in literals:
        if id(node) in skip or id(node) in inner or not (is_store_name(text) or is_array_leaf(text)):
            continue
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if not exempt.intersection(lines):
            found.append((node.lineno, f"{path}:{node.lineno}: {text!r}"))
    return [text for _, text in sorted(found)]


# -- the import graph ------------------------------------------------------------------------------
def module_name(path: str) -> str:
    """gentrace/store/schema.py -> gentrace.store.schema; gentrace/store/__init__.py -> gentrace.store."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _base(module: str, path: str, node: ast.ImportFrom) -> str:
    """The absolute module of `from <base> import ...` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, node.module] if node.module else package)


def imports(path: str, source: str, modules: frozenset[str]) -> Iterator[tuple[str, str, int]]:
    """(imported gentrace module, the name imported from it or "", line) of every import, at any depth.

    `from pkg import name` imports the module pkg.name when there is one (as import-linter counts it),
    else the name from pkg; `import a.b` imports a.b.
    """
    module = module_name(path)
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, "", node.lineno) if sub in modules else (base, alias.name, node.lineno)


def import_graph(files: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Module -> {imported gentrace module: `path:line` of its first import}."""
    modules = frozenset(module_name(p) for p in files)
    graph: dict[str, dict[str, str]] = {module_name(p): {} for p in files}
    for path, source in files.items():
        edges = graph[module_name(path)]
        for target, _name, line in imports(path, source, modules):
            if target in modules and target != module_name(path):
                edges.setdefault(target, f"{path}:{line}")
    return graph


# -- 2. import cycles ------------------------------------------------------------------------------
def _cycles(graph: Mapping[str, Mapping[str, str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        # breadth-first from start back to start inside the component: the shortest cycle through it
        previous: dict[str, str] = {}
        frontier, end = [start], None
        while frontier and end is None:
            following = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w not in component:
                        continue
                    if w == start:
                        end = v
                        break
                    if w not in previous:
                        previous[w] = v
                        following.append(w)
                if end is not None:
                    break
            frontier = following
        assert end is not None
        path = [end]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([start, *reversed(path[:-1]), start])
    return sorted(cycles)


def import_cycles(files: Mapping[str, str]) -> list[str]:
    """`path:line: a -> b` for every import on one cycle per strongly connected component."""
    graph = import_graph(files)
    found = []
    for cycle in _cycles(graph):
        found.append("cycle " + " -> ".join(cycle))
        found.extend(f"  {graph[a][b]}: {a} -> {b}" for a, b in zip(cycle, cycle[1:], strict=False))
    return found


# -- 3. private names ------------------------------------------------------------------------------
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def private_uses(path: str, source: str, modules: frozenset[str]) -> list[str]:
    """`path:line: ...` for every private name of another gentrace module imported or read here."""
    module = module_name(path)
    tree = ast.parse(source, path)
    found = []
    for target, name, line in imports(path, source, modules):
        private = name if _private(name) else next((p for p in target.split(".") if _private(p)), None)
        if private and target != module:
            found.append((line, f"{path}:{line}: imports {private} from {target}"))
    # local name -> the gentrace module it is bound to
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    bound[alias.asname or PACKAGE] = alias.name if alias.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        dotted = _dotted(node.value)
        if dotted is None or dotted.split(".")[0] not in bound:
            continue
        head, _, rest = dotted.partition(".")
        target = ".".join(filter(None, (bound[head], rest)))
        if target in modules and target != module:
            found.append((node.lineno, f"{path}:{node.lineno}: reads {target}.{node.attr}"))
    return [text for _, text in sorted(set(found))]


def private_offenders(files: Mapping[str, str]) -> list[str]:
    """Every private use of every file."""
    modules = frozenset(module_name(p) for p in files)
    return [text for path, source in files.items() for text in private_uses(path, source, modules)]


def name_offenders(files: Mapping[str, str]) -> list[str]:
    """Every store-name literal of every file."""
    return [text for path, source in files.items() for text in store_name_literals(path, source)]


# -- the tree --------------------------------------------------------------------------------------
def _report(rule: str, offenders: list[str]) -> str:
    return f"{rule} ({len(offenders)}):\n" + "\n".join(offenders)


def test_no_store_name_outside_the_schema() -> None:
    """Issue 13: a stream or array path is spelled only in gentrace/store/schema.py."""
    offenders = name_offenders(sources())
    if offenders:
        pytest.fail(
            _report("store names spelled outside gentrace/store/schema.py; use schema's Streams", offenders),
            pytrace=False,
        )


def test_no_import_cycle() -> None:
    """The gentrace modules import each other without a cycle (imports inside functions count)."""
    cycles = import_cycles(sources())
    if cycles:
        pytest.fail(_report("import cycles, with the import that closes each step", cycles), pytrace=False)


def test_no_private_name_of_another_module() -> None:
    """A gentrace module uses only the public names of the others."""
    offenders = private_offenders(sources())
    if offenders:
        pytest.fail(_report("private names of other gentrace modules", offenders), pytrace=False)


def test_store_names_come_from_the_schema() -> None:
    """The checked names are the schema's streams and groups (a stream added there is checked here)."""
    assert {"metrics", "grad", "preds", "data", "checkpoints", "derived"} <= STORE_NAMES
    assert set(schema.STREAMS) <= STORE_NAMES


# -- each check can fail ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('x = reader.array("grad/step")\n', ["gentrace/a.py:1: 'grad/step'"]),
        ('x = reader.has("acts")\n', ["gentrace/a.py:1: 'acts'"]),
        ('x = f"preds/{split}"\n', ["gentrace/a.py:1: 'preds/'"]),
        ('x = f"metrics{suffix}/{a}"\n', ["gentrace/a.py:1: 'metrics'"]),
        (
            'x = "checkpoints/step-1"\ny = "derived/mi/linear"\n',
            ["gentrace/a.py:1: 'checkpoints/step-1'", "gentrace/a.py:2: 'derived/mi/linear'"],
        ),
        (
            'def f():\n    """grad/<tensor>/sum is read here."""\n    return "data/labels_train"\n',
            ["gentrace/a.py:3: 'data/labels_train'"],
        ),
        ('x = {"params": 1, "params_fine": 2}\n', ["gentrace/a.py:1: 'params'", "gentrace/a.py:1: 'params_fine'"]),
        # not store names: config keys, other words, text after a formatted value, docstrings, exempt lines
        ('x = "record.params.every_epochs"\ny = "gradient"\nz = "metricsx/a"\n', []),
        ('x = f"{root}/grad/{t}"\n', []),
        (
            'x = f"{stream}/step"\ny = f"grad/{t}/sum"\n',
            ["gentrace/a.py:1: '/step'", "gentrace/a.py:2: '/sum'", "gentrace/a.py:2: 'grad/'"],
        ),
        ('x = f"{a}/{b}"\ny = f"{n}/stepwise"\n', []),
        ('"""data/ holds the indices."""\n', []),
        ('x = cfg.get("data")  # layout: not a store name (the config section)\n', []),
    ],
)
def test_store_name_check_finds_offenders(source: str, expected: list[str]) -> None:
    """The literal check flags exactly the store names of a snippet."""
    assert name_offenders({"gentrace/a.py": source}) == expected


def test_store_name_check_skips_the_schema() -> None:
    """gentrace/store/schema.py is where the names live."""
    assert name_offenders({SCHEMA_FILE: 'METRICS = MetricsStream("metrics")\n'}) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"gentrace/a.py": "from gentrace import b\n", "gentrace/b.py": "def f():\n    import gentrace.a\n"},
            [
                "cycle gentrace.a -> gentrace.b -> gentrace.a",
                "  gentrace/a.py:1: gentrace.a -> gentrace.b",
                "  gentrace/b.py:2: gentrace.b -> gentrace.a",
            ],
        ),
        (
            {
                "gentrace/p/__init__.py": "",
                "gentrace/p/a.py": "from .b import x\n",
                "gentrace/p/b.py": "from gentrace.p.c import y\n",
                "gentrace/p/c.py": "def g():\n    from gentrace.p import a\n",
            },
            [
                "cycle gentrace.p.a -> gentrace.p.b -> gentrace.p.c -> gentrace.p.a",
                "  gentrace/p/a.py:1: gentrace.p.a -> gentrace.p.b",
                "  gentrace/p/b.py:1: gentrace.p.b -> gentrace.p.c",
                "  gentrace/p/c.py:2: gentrace.p.c -> gentrace.p.a",
            ],
        ),
        ({"gentrace/a.py": "from gentrace import b\n", "gentrace/b.py": "import numpy\n"}, []),
    ],
)
def test_cycle_check_finds_cycles(files: dict[str, str], expected: list[str]) -> None:
    """The cycle check reports each cycle with the import that closes every step of it."""
    assert import_cycles(files) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from gentrace.b import _helper\n", ["gentrace/a.py:1: imports _helper from gentrace.b"]),
        ("from gentrace import b\nb._helper()\n", ["gentrace/a.py:2: reads gentrace.b._helper"]),
        ("from gentrace import b as bee\nbee._X\n", ["gentrace/a.py:2: reads gentrace.b._X"]),
        ("import gentrace.b\ngentrace.b._helper\n", ["gentrace/a.py:2: reads gentrace.b._helper"]),
        ("def f():\n    from . import b\n    return b._y\n", ["gentrace/a.py:3: reads gentrace.b._y"]),
        # public names, dunders, privates of non-gentrace modules and of objects are fine
        ("from gentrace.b import helper, __version__\nimport numpy as np\nnp._x\nself._y\n", []),
    ],
)
def test_private_check_finds_offenders(source: str, expected: list[str]) -> None:
    """The private-name check flags imports and reads of another module's `_name`."""
    files = {"gentrace/__init__.py": "", "gentrace/a.py": source, "gentrace/b.py": "_helper = 1\n"}
    assert private_offenders(files) == expected
