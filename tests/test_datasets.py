"""The datasets/ folder as a whole: a folder of TFDS builder packages, never a package itself.

Each builder's own tests sit beside it, `datasets/<name>/<name>_dataset_builder_test.py`,
as in TFDS; `tests/test_tfds_cli.py` builds them all with the `tfds` command.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "datasets"
BUILDERS = ("synthetic_em", "isbi2012", "ctc2d", "image_folder")


def test_datasets_folder_is_not_a_package():
    assert not (DATASETS / "__init__.py").exists(), "datasets/ must never be an importable package"
    for name in BUILDERS:
        package = ast.parse((DATASETS / name / "__init__.py").read_text())
        # What `tfds build` imports first: it makes an uninstalled checkout's pipeline importable.
        assert any(isinstance(n, ast.Import) and n.names[0].name == "pipeline_checkout" for n in package.body), name
        source = (DATASETS / name / f"{name}_dataset_builder.py").read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import of {node.module!r}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m and m.split(".")[0] == "datasets" for m in imported), name
