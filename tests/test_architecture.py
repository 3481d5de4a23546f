"""docs/architecture.md is the code's: the module map lists every module once with its imports,
the imports form no cycle, and no module imports one of a higher layer than its own."""

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
DOC = ROOT / "docs" / "architecture.md"


def module_name(path: Path, root: Path = PIPELINE) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pipeline_imports(path: Path, root: Path = PIPELINE) -> set[str]:
    """The modules of pipeline/ a file imports, anywhere in it (in functions too), named as in the map."""
    packages = {module_name(p.parent / "__init__.py", root) for p in root.rglob("__init__.py")} - {""}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            base = node.module.removeprefix("pipeline").removeprefix(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                # `from pipeline.files import io` and `from pipeline.metrics import common` name modules;
                # `from pipeline.data import DATASETS` names a thing of the module `data`.
                is_module = (root / Path(*candidate.split("."))).with_suffix(".py").exists() or candidate in packages
                found.add(candidate if is_module else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pipeline.") for a in node.names if a.name.startswith("pipeline.")}
    # "": a name of `pipeline/__init__.py` itself (`__version__`), which Python runs before any
    # module of the package, so importing from it adds no arrow between modules.
    return found - {module_name(path, root), ""}


def import_map(root: Path = PIPELINE) -> dict[str, set[str]]:
    """Every module of pipeline/ (`pipeline/__init__.py` aside) -> the modules it imports."""
    code = {module_name(path, root): pipeline_imports(path, root) for path in root.rglob("*.py")}
    code.pop("")
    return code


def import_graph(root: Path = PIPELINE) -> dict[str, set[str]]:
    """`import_map` with what Python runs besides: importing `pipeline.a.b` from outside the
    package `a` runs `pipeline/a/__init__.py` first, so a package's `__init__` that imports
    back is a cycle too."""
    code = import_map(root)
    graph = {}
    for module, imported in code.items():
        graph[module] = set(imported)
        for target in imported:
            parts = target.split(".")
            packages = {".".join(parts[:n]) for n in range(1, len(parts))}
            graph[module] |= {p for p in packages if p in code and module != p and not module.startswith(p + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module
    (or a module importing itself), each sorted, by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1 or module in graph.get(module, ()):
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def documented() -> dict[str, set[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            [name] = re.findall(r"`([\w.]+)`", cells[0])
            assert name not in rows, f"{name} listed twice"
            rows[name] = set() if cells[2] == "-" else {part.strip() for part in cells[2].split(",")}
    return rows


def documented_layers() -> list[list[str]]:
    """The section "The layers": one numbered line per layer, low to high, its modules or
    packages in backticks before the first colon."""
    section = DOC.read_text().split("## The layers", 1)[1].split("\n## ", 1)[0]
    return [re.findall(r"`([\w.]+)`", line.split(":", 1)[0])
            for line in section.splitlines() if re.match(r"\d+\. ", line)]


def layer_of(module: str, layers: list[list[str]]) -> int:
    """The layer of the longest entry that is `module` or a package holding it."""
    matches = [(len(entry), number) for number, entries in enumerate(layers) for entry in entries
               if module == entry or module.startswith(entry + ".")]
    assert matches, f"{module} is in no layer of docs/architecture.md"
    return max(matches)[1]


def upward_imports(code: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    return sorted(f"{module} (layer {layer_of(module, layers) + 1}) imports {target} "
                  f"(layer {layer_of(target, layers) + 1})"
                  for module, imported in code.items() for target in imported
                  if layer_of(target, layers) > layer_of(module, layers))


def _packages_without_imports(code: dict[str, set[str]]) -> set[str]:
    """Packages whose `__init__` only describes its modules: named in the map's headings, not its rows."""
    return {name for name, imported in code.items() if (PIPELINE / Path(*name.split("."))).is_dir() and not imported}


def test_every_module_is_in_the_map_with_the_modules_it_imports():
    code = import_map()
    for package in _packages_without_imports(code):
        code.pop(package)
    assert documented() == code


def test_the_imports_form_no_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_one_of_a_higher_layer():
    assert upward_imports(import_map(), documented_layers()) == []


def test_no_stage_imports_another():
    code = import_map()
    assert not {module: imported for module, imported in code.items()
                if module.startswith("stages.") and {t for t in imported if t.startswith("stages.")}}


def test_the_cycle_check_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_cycle_check_finds_a_package_init_that_imports_back(tmp_path):
    # The pitfall of a package: `pipeline.data` imports `pipeline.config.schema`, which runs
    # `pipeline/config/__init__.py` first; if that re-exported `resolve`, which imports
    # `pipeline.data`, the two would be a cycle although no module names the other.
    copy = shutil.copytree(PIPELINE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "config" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom pipeline.config.resolve import preset\n")
    [cycle] = cycles(import_graph(copy))
    assert {"config", "config.resolve", "data"} <= set(cycle)


def test_the_layer_check_finds_a_planted_upward_import(tmp_path):
    copy = shutil.copytree(PIPELINE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from pipeline.stages import train\n")
    assert upward_imports(import_map(copy), documented_layers()) == ["errors (layer 1) imports stages.train (layer 8)"]
    assert cycles(import_graph(copy)) != []  # and, as everything imports errors, a cycle
