"""Shared fixtures: one trained smoke run that the end-to-end tests look at."""

import pytest

from pipeline.cli import main


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> dict:
    """`--stage all --preset smoke` on the embedded default, then its model published by
    `--stage export` into a temp folder."""
    root = tmp_path_factory.mktemp("smoke")
    run_dir, exports = root / "run", root / "saved_models"
    assert main(["--stage", "all", "--preset", "smoke", "--run-dir", str(run_dir), "--set", f"export.root={exports}"]) == 0
    exports_after_all = exports.exists()
    assert main(["--stage", "export", "--run-dir", str(run_dir)]) == 0
    # Later commands on the shared run (a predict with other settings) rewrite config.yaml; the
    # export's settings stay here.
    exported_config = root / "config.exported.yaml"
    exported_config.write_bytes((run_dir / "config.yaml").read_bytes())
    return {"run_dir": run_dir, "exports": exports, "exports_after_all": exports_after_all,
            "exported_config": exported_config}
