"""The package's layering (CONTRIBUTING.md, "How the code is laid out"), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "distill"


def _imports() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported distill module, imported name)], function-level imports included."""
    out: dict[str, list[tuple[str, str]]] = {}
    for path in SRC.rglob("*.py"):
        mod = ".".join(("distill", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill"):
                for alias in node.names:
                    target = node.module
                    if node.module in ("distill", "distill.commands") and alias.name != "__version__":
                        target = f"{node.module}.{alias.name}"  # `from distill.recipes import train`
                    found.append((target, alias.name))
            elif isinstance(node, ast.Import):
                found += [(a.name, "") for a in node.names if a.name.startswith("distill")]
        out[mod] = found
    return out


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


def test_the_lowest_layers_import_nothing_above_them():
    deps = {m: {t for t, _ in d} for m, d in _imports().items()}
    assert all(t.startswith("distill.losses.") for m, d in deps.items() if m.startswith("distill.losses") for t in d)
    assert deps["distill.losses.chunked"] <= {"distill.losses.divergences"}
    assert not any("distill.cli" in d for m, d in deps.items() if m not in ("distill.__main__", "distill.cli"))


def test_the_train_recipe_does_not_branch_on_the_teacher_kind():
    source = (SRC / "training.py").read_text() + (SRC / "commands" / "train.py").read_text()
    for pattern in ("TeacherCacheSpec", "CachedTeacher", "LiveTeacher", "cache is not None", "TeacherCache("):
        assert pattern not in source, pattern
