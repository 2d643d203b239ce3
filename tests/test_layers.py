"""The package's layers point one way: apps → training & eval → guards → core → leaves (docs/ARCHITECTURE.md).

The test reads every module of ``safegen/`` (imports at any depth count, function-local ones included; only
``if TYPE_CHECKING:`` blocks are skipped, they never run) and checks that no module imports one of a higher layer
and that the import graph has no cycle.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safegen"

#: Layer of a module: the first rule whose prefix matches (longest prefixes first), else "leaves".
RULES = [
    ("safegen.eval.oracles", "leaves"),  # the oracles are a leaf: the output guard judges images with them
    ("safegen.cli", "apps"),
    ("safegen.demo", "apps"),
    ("safegen.training", "training & eval"),
    ("safegen.eval", "training & eval"),
    ("safegen.guards", "guards"),
    ("safegen.api", "guards"),  # protect(): resolves guard names through the registry
    ("safegen.community", "guards"),  # the community pipelines' mixin calls protect()
    ("safegen.protection", "core"),
    ("safegen.specs", "core"),
    ("safegen.outputs", "core"),
    ("safegen.hooks", "core"),
    ("safegen.unet_rows", "core"),
    ("safegen.guard", "core"),
]
RANK = {"leaves": 0, "core": 1, "guards": 2, "training & eval": 3, "apps": 4}


def layer(module: str) -> str:
    for prefix, name in sorted(RULES, key=lambda r: -len(r[0])):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "leaves"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The safegen modules ``module`` imports (a name imported from a package counts as its submodule when
    there is one)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in known and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_imports_only_its_layer_and_below():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if RANK[layer(target)] > RANK[layer(module)]:
                upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert upward == []


def test_the_import_graph_has_no_cycle():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_layer_rules_see_real_modules():
    """The test cannot pass by naming modules that do not exist: every rule matches a module, and the check
    finds real imports (the CLI imports the API; a guard imports the core)."""
    known = modules()
    for prefix, _ in RULES:
        assert any(m == prefix or m.startswith(prefix + ".") for m in known), prefix
    g = graph()
    assert "safegen.guard" in g["safegen.guards.sld"] and "safegen.api" in g["safegen.cli"]
    assert layer("safegen.guards.sld") == "guards" and layer("safegen.policy") == "leaves"
