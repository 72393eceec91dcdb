"""The package's shape, checked on the source: components and recipes (torchtune's rule: recipes
import components, nothing imports a recipe), ``adamix_zoo`` never imports ``registry`` or
``federation`` except in its CLI, and no import cycle. Imports inside functions count too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adamix_zoo", "federation", "registry")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (``from a import b`` also names ``a.b``)."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def sources(*folders: str) -> dict[str, Path]:
    return {module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (packages resolved to their modules)."""
    modules = sources(*PACKAGES)
    return {name: {m for m in imported(path) if m in modules and m != name} for name, path in modules.items()}


def is_cli(name: str) -> bool:
    return name == "adamix_zoo.cli" or name.endswith("commands")


def is_recipe(name: str) -> bool:
    return name == "adamix_zoo.recipes" or name.startswith("adamix_zoo.recipes.")


def test_adamix_zoo_imports_neither_registry_nor_federation():
    offenders = {
        name: sorted(m for m in imported(path) if m.split(".")[0] in ("registry", "federation"))
        for name, path in sources("adamix_zoo").items() if not is_cli(name)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_cli_examples_and_bench_import_a_recipe():
    offenders = {
        name: sorted(m for m in imported(path) if is_recipe(m))
        for name, path in sources(*PACKAGES).items()  # tests test the recipes; examples, bench use them
        if not (is_cli(name) or is_recipe(name))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_recipes_are_leaves():
    """A recipe imports components, never another recipe (each spells out its own setup -> save)."""
    graph = project_imports()
    recipes = [n for n in graph if is_recipe(n) and n != "adamix_zoo.recipes"]
    assert recipes and {n: sorted(m for m in graph[n] if is_recipe(m)) for n in recipes} == dict.fromkeys(recipes, [])


def test_no_import_cycle():
    graph = project_imports()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
