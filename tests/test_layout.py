"""The package's layout (CONTRIBUTING.md, "How the code is laid out"), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "distill"

# The layers, lowest first: a module imports from its own layer and the layers below it, never from one above.
# An entry is a module or a package (every module in it); a module belongs to the longest entry that holds it.
LAYERS = [
    ("distill", "distill.errors", "distill.checkpoint", "distill.losses"),
    ("distill.config",),
    ("distill.tokenizer", "distill.models", "distill.data", "distill.crosstok"),
    ("distill.sharding", "distill.lora", "distill.caching", "distill.generation", "distill.server", "distill.evaluation",
     "distill.pruning"),
    ("distill.engines",),
    ("distill.teachers", "distill.sources", "distill.training_hooks"),
    ("distill.training",),
    ("distill.commands", "distill.tasks"),
    ("distill.api",),
    ("distill.cli", "distill.__main__"),
]
# Imported inside a function, not at the top: the optional extras, which the core install does not have.
OPTIONAL_EXTRAS = {"peft", "lm_eval", "fastapi", "uvicorn", "tensorboard"}


def _module_name(path: Path) -> str:
    return ".".join(("distill", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def _sources() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text()) for path in sorted(SRC.rglob("*.py"))}


def _imports() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported distill module, imported name)], function-level imports included. ``from distill.x
    import y`` imports module ``distill.x.y`` when there is one, else the name ``y`` of ``distill.x``."""
    sources = _sources()
    out: dict[str, list[tuple[str, str]]] = {}
    for mod, tree in sources.items():
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distill":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.append((sub if sub in sources else node.module, alias.name))
            elif isinstance(node, ast.Import):
                found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "distill"]
        out[mod] = found
    return out


def _layer(module: str) -> int:
    best = max((entry for layer in LAYERS for entry in layer if module == entry or module.startswith(entry + ".")),
               key=len, default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to CONTRIBUTING.md)"
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_no_import_cycle():
    imports = _imports()
    graph = {m: {t for t, _ in deps if t in imports} for m, deps in imports.items()}

    def reaches(start: str, goal: str) -> bool:
        todo, seen = list(graph[start]), set()
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    cyclic = sorted(m for m in graph if reaches(m, m))
    assert not cyclic, f"modules in an import cycle: {cyclic}"


def test_no_private_name_is_imported_across_modules():
    private = [(m, t, n) for m, deps in _imports().items() for t, n in deps if n.startswith("_") and not n.startswith("__")]
    assert not private


def test_imports_sit_at_the_top_of_a_module():
    """No import inside a function or method, except of an optional extra (rule 1 of CONTRIBUTING.md)."""
    inside = []
    for mod, tree in _sources().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    roots = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {(node.module or "").split(".")[0]} if not node.level else {"."}
                else:
                    continue
                if not roots <= OPTIONAL_EXTRAS:
                    inside.append(f"{mod}.{fn.name}, line {node.lineno}: {ast.unparse(node)}")
    assert not inside, "imports inside functions:\n" + "\n".join(sorted(set(inside)))


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    upward = []
    for mod, deps in _imports().items():
        for target, _ in deps:
            if _layer(target) > _layer(mod):
                upward.append(f"{mod} (layer {_layer(mod)}) imports {target} (layer {_layer(target)})")
    assert not upward, "\n".join(sorted(set(upward)))


def test_commands_never_import_one_another():
    crossing = sorted({(m, t) for m, deps in _imports().items() if m.startswith("distill.commands.")
                       for t, _ in deps if t.startswith("distill.commands")})
    assert not crossing, crossing


def test_the_lowest_layers_import_nothing_above_them():
    deps = {m: {t for t, _ in d} for m, d in _imports().items()}
    losses = {m: d for m, d in deps.items() if m.startswith("distill.losses")}
    assert all(t.startswith("distill.losses.") for d in losses.values() for t in d), losses
    assert deps["distill.losses.chunked"] <= {"distill.losses.divergences", "distill.losses.fused"}
    assert deps["distill.losses.fused"] <= {"distill.losses.divergences"}
    assert not any("distill.cli" in d for m, d in deps.items() if m not in ("distill.__main__", "distill.cli"))


# Where a teacher kind may be named: the teachers themselves, the engines they run on, and their config specs.
KIND_HOMES = ("distill.teachers", "distill.engines", "distill.config")
KIND_TAGS = {"live", "cache", "server", "mixture", "teachers", "self", "peers", "student_base"}
# Teacher classes of earlier layouts, refused by name too.
OLD_TEACHER_CLASSES = {"LiveTeacher", "ServerTeacher", "SelfTeacher", "StudentBaseTeacher", "LiveCorrector",
                       "ServerCorrector", "ServerCapturer", "LocalSampler", "ServerSampler"}


def _teacher_kind_names() -> set[str]:
    """The names that stand for one teacher kind: what teachers/ modules define beyond the package's public
    protocol (``distill.teachers.__all__``), and the teacher specs of config.py (not ``ModelSpec``: the student's
    too)."""
    sources = _sources()
    public = set(next(ast.literal_eval(n.value) for n in sources["distill.teachers"].body
                      if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)))
    defined = {n.name for mod, tree in sources.items() if mod.startswith("distill.teachers.")
               for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and not n.name.startswith("_")}
    specs = {n.name for n in sources["distill.config"].body if isinstance(n, ast.ClassDef)
             and (n.name.endswith("TeacherSpec") or n.name in ("TeacherCacheSpec", "ModelMember", "CacheMember",
                                                             "ServerMember"))}
    return (defined - public) | specs | OLD_TEACHER_CLASSES


def test_only_teachers_engines_and_config_name_a_teacher_kind():
    """Outside teachers/, engines/ and config.py, code asks a teacher or an engine what it can do; it never names a
    kind: not by class (CachedTeacher), not by spec type (ServerTeacherSpec, in an isinstance check or anywhere),
    not by kind string (``teacher.kind == "live"``)."""
    names = _teacher_kind_names()
    assert {"CachedTeacher", "MixtureTeacher", "EngineTeacher", "ServerTeacherSpec", "TeacherCacheSpec"} <= names
    found = []
    for mod, tree in _sources().items():
        if mod.startswith(KIND_HOMES):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in names or isinstance(node, ast.Attribute) and node.attr in names:
                found.append(f"{mod}, line {node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.alias) and node.name in names:
                found.append(f"{mod}: imports {node.name}")
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                tags = {c.value for side in sides for c in ast.walk(side)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str)} & KIND_TAGS
                kind = any(isinstance(c, ast.Attribute) and c.attr == "kind" or isinstance(c, ast.Name)
                           and "kind" in c.id for side in sides for c in ast.walk(side))
                if tags and kind:
                    found.append(f"{mod}, line {node.lineno}: {ast.unparse(node)}")
    assert not found, "a teacher kind named outside teachers/, engines/ and config.py:\n" + "\n".join(sorted(found))


def test_the_training_run_does_not_branch_on_the_teacher_kind():
    source = (SRC / "training.py").read_text() + (SRC / "api.py").read_text()
    for pattern in ("TeacherCacheSpec", "CachedTeacher", "LiveTeacher", "cache is not None", "TeacherCache("):
        assert pattern not in source, pattern


# A function a reader must hold whole stays short: at most this many lines from its `def` to its last line, its
# docstring left out (a nested function counts in its own line and in its parent's).
MAX_FUNCTION_LINES = 80
# Longer ones, each with why; at most two, and an entry goes as soon as its function is short.
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}


def _function_lengths(sources: dict[str, ast.Module]) -> dict[str, int]:
    """``module.qualname`` -> lines of every function and method in ``sources``, its docstring left out."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    doc = child.body[0] if child.body and ast.get_docstring(child, clean=False) is not None else None
                    skip = doc.end_lineno - doc.lineno + 1 if doc is not None else 0
                    lengths[name] = child.end_lineno - child.lineno + 1 - skip
                visit(child, name)
            else:
                visit(child, prefix)

    for mod, tree in sources.items():
        visit(tree, mod)
    return lengths


def test_no_function_is_longer_than_a_reader_can_hold():
    probe = ast.parse('class C:\n    @staticmethod\n    def f():\n        """A docstring\n        on two lines."""\n'
                      '        def g():\n            return 1\n\n        return g\n')
    assert _function_lengths({"m": probe}) == {"m.C.f": 5, "m.C.f.g": 2}
    lengths = _function_lengths(_sources())
    assert len(LONG_FUNCTIONS_ALLOWED) <= 2, "split a function instead of allowing another long one"
    long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    over = sorted(f"{name}: {n} lines" for name, n in long.items() if name not in LONG_FUNCTIONS_ALLOWED)
    assert not over, (f"functions over {MAX_FUNCTION_LINES} lines (docstring left out): split them into named "
                      "steps:\n" + "\n".join(over))
    stale = sorted(name for name in LONG_FUNCTIONS_ALLOWED if name not in long)
    assert not stale, f"short now (or gone): remove from LONG_FUNCTIONS_ALLOWED: {stale}"
