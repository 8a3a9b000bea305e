"""The package's shape: each layer imports only from the layers below it, and no modules import each other in a
cycle. Read from the source (every import statement, lazy ones inside functions too), nothing imported."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peftcli"
# Lowest first. Top-level modules not listed are the shared base (errors, files, run_lock).
LAYERS = ["config", "data", "models", "methods", "training", "runs", "workflows", "cli"]


def module_files() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `name` imports; `from pkg import sub` counts as importing pkg.sub."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = module_files()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top == "__main__":
        return len(LAYERS)
    return LAYERS.index(top) + 1 if top in LAYERS else 0


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    # A package's __init__ importing its own modules, which import siblings from the package, is the only
    # edge a cycle may not use: those edges are real imports, so they count here too.
    assert cycles(graph()) == []


def test_every_top_level_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(LAYERS)


def test_the_checks_see_an_upward_import_and_a_cycle():
    edges = {"peftcli.data.x": {"peftcli.workflows.y"}, "peftcli.workflows.y": {"peftcli.data.x"}}
    assert layer("peftcli.workflows.y") > layer("peftcli.data.x")
    assert cycles(edges) == [["peftcli.data.x", "peftcli.workflows.y"]]
