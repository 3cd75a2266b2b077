"""The import rules of docs/ARCHITECTURE.md §3, read from the source with `ast`.

Every `import deltakd...` / `from deltakd... import` counts, at module level or inside a
function (a lazy import is still a dependency); imports under `if TYPE_CHECKING:` do not (they
never run). Modules named as strings for plug-ins (`METHOD_MODULES`, `BACKENDS`,
`SOURCE_FACTORIES`, `COMMAND_MODULES`) are registries, not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "deltakd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """deltakd modules `path` imports at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("deltakd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.startswith("deltakd"):
                out.add(name)
                # `from deltakd.x import y` may import the submodule deltakd.x.y
                for a in node.names:
                    if (SRC / Path(*f"{name}.{a.name}".split("."))).with_suffix(".py").exists():
                        out.add(f"{name}.{a.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


GRAPH = import_graph()


def _area(module: str) -> str:
    """`deltakd.references.cache.build` -> `references`; `deltakd.loading` -> `loading`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _arrows(src_areas: set[str], dst_areas: set[str]) -> list[str]:
    return sorted(
        f"{a} -> {b}"
        for a, deps in GRAPH.items()
        for b in deps
        if _area(a) in src_areas and _area(b) in dst_areas
    )


def test_the_graph_is_read():
    # A sanity check of the parser: known arrows are found.
    assert "deltakd.train.methods" in GRAPH["deltakd.train.trainer"]
    assert "deltakd.losses" in GRAPH["deltakd.targets"]
    assert "deltakd.generation" in GRAPH["deltakd.train.seqkd"]
    assert len(GRAPH) > 60


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ({"references", "data"}, {"train", "eval"}),  # references/, data/ never reach up
        ({"train"}, {"eval"}),  # evaluation sits above training
        ({"loading", "generation"}, {"train", "eval", "references"}),
        ({"targets"}, {"train", "eval", "references", "data", "config"}),
        ({"heads"}, {"train", "eval", "references", "data", "config", "loading", "targets"}),
        ({"config"}, {"eval", "references", "data", "losses", "generation", "loading"}),
    ],
    ids=["references,data", "train", "loading,generation", "targets", "heads", "config"],
)
def test_no_arrow_up(lower, higher):
    assert _arrows(lower, higher) == []


def test_config_reaches_up_only_to_the_method_registry():
    # The schema asks each method to check the settings it uses (`validate`); that registry
    # lives with the methods. Nothing else of train/ is imported by config/.
    ups = {b for a, deps in GRAPH.items() if _area(a) == "config" for b in deps
           if _area(b) == "train"}  # fmt: skip
    assert ups == {"deltakd.train.methods"}


def test_losses_import_nothing_else():
    outside = _arrows({"losses"}, {a for a in map(_area, GRAPH) if a != "losses"})
    assert outside == []


def test_no_import_cycle_inside_train():
    train = {m: {d for d in deps if _area(d) == "train"} for m, deps in GRAPH.items()
             if _area(m) == "train"}  # fmt: skip
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(train.get(m, ())):
            if d == "deltakd.train":  # the package's lazy facade imports nothing
                continue
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(train):
        if m not in state:
            visit(m)
