"""docs/architecture.md's module map is the code's: every module listed once, with its imports."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "pipeline").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pipeline_imports(path: Path) -> set[str]:
    """The modules of pipeline/ a file imports, anywhere in it, named as in the map."""
    packages = {module_name(p.parent / "__init__.py") for p in (ROOT / "pipeline").rglob("__init__.py")} - {""}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            base = node.module.removeprefix("pipeline").removeprefix(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                # `from pipeline import io` and `from pipeline.metrics import common` name modules;
                # `from pipeline.data import DATASETS` names a thing of the module `data`.
                is_module = (ROOT / "pipeline" / Path(*candidate.split("."))).with_suffix(".py").exists() \
                    or candidate in packages
                found.add(candidate if is_module else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("pipeline.") for a in node.names if a.name.startswith("pipeline.")}
    return found - {module_name(path)}


def documented() -> dict[str, set[str]]:
    rows = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            [name] = re.findall(r"`([\w.]+)`", cells[0])
            assert name not in rows, f"{name} listed twice"
            rows[name] = set() if cells[2] == "-" else {part.strip() for part in cells[2].split(",")}
    return rows


def test_every_module_is_in_the_map_with_the_modules_it_imports():
    code = {module_name(path): pipeline_imports(path) for path in (ROOT / "pipeline").rglob("*.py")}
    code.pop("")  # pipeline/__init__.py
    if "metrics" in code and not code["metrics"]:
        code.pop("metrics")  # a package whose __init__ only points to its modules
    assert documented() == code
