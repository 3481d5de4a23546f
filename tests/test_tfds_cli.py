"""The builders in datasets/ built by TFDS's own command line, `tfds build datasets/<name>`.

Each test runs the real `tfds` command (the console script of tensorflow-datasets, from
this environment) in a subprocess, from the repository root, exactly as datasets/README.md
shows it, on small fake files, then reads the prepared data back with
`tfds.builder_from_directory`, i.e. without the builder code.

In tensorflow-datasets 4.9.10 the `tfds` command imports `apache_beam` and `mlcroissant`
at start-up, which tensorflow-datasets does not install: they come with this project's
`tfds-cli` extra (also part of `test`). Without them these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fakes import CTC_ANNOTATED, CTC_NAME, ISBI_DIR, write_ctc, write_image_folder, write_isbi
from pipeline import data as pipeline_data

ROOT = Path(__file__).resolve().parents[1]

_missing = [m for m in ("apache_beam", "mlcroissant") if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip(
        f"the `tfds` command needs {' and '.join(_missing)}, not installed: "
        "pip install -e '.[tfds-cli]'",
        allow_module_level=True,
    )


def tfds_command() -> str:
    """The `tfds` console script of the running interpreter's environment."""
    script = Path(sysconfig.get_path("scripts")) / "tfds"
    if script.is_file():
        return str(script)
    found = shutil.which("tfds")
    if found is None:
        pytest.fail(f"no `tfds` console script in {script.parent} or on PATH")
    return found


def tfds_build(*args: str | Path, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """`tfds build ARGS` from the repository root, by `command` (default: the `tfds` console script)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [*(command or [tfds_command()]), "build", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_built(result: subprocess.CompletedProcess, prepared: Path, counts: dict[str, int]) -> tfds.core.DatasetBuilder:
    """The command succeeded and `prepared` holds `counts` examples per split, readable as written."""
    assert result.returncode == 0, f"tfds build failed ({result.returncode}):\n{result.stderr[-4000:]}"
    assert (prepared / "dataset_info.json").is_file(), result.stderr[-4000:]
    builder = tfds.builder_from_directory(str(prepared))
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == counts
    for split, count in counts.items():
        examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        assert len(examples) == count
        for example in examples:
            assert example["image"].dtype == example["label"].dtype == np.uint8
            assert example["image"].shape == example["label"].shape
            assert example["instances"].shape == example["image"].shape[:2]
    # tfds.load by name on the same data_dir finds the prepared data too.
    data_dir, name = prepared.parents[1], builder.info.name
    if prepared.parent.name != name:  # <data_dir>/<name>/<config>/<version>
        data_dir, name = prepared.parents[2], f"{name}/{prepared.parent.name}"
    first = next(iter(tfds.load(name, data_dir=str(data_dir), split=next(iter(counts)))))
    assert set(first) >= {"image", "label", "instances", "id"}
    return builder


def test_synthetic_em(tmp_path):
    result = tfds_build("datasets/synthetic_em", "--config", "small", "--data_dir", tmp_path)
    builder = check_built(result, tmp_path / "synthetic_em" / "small" / "1.0.0", {"train": 2, "validation": 1, "test": 1})
    assert builder.info.features["image"].shape == (64, 64, 1)


def test_synthetic_em_from_a_checkout_where_the_project_is_not_installed(tmp_path):
    # The `tfds` command in a Python that cannot import `pipeline`: -I -S leave the current
    # folder, PYTHONPATH and site-packages' .pth files (the editable install's import hook)
    # out; site-packages itself is put back. datasets/pipeline_checkout.py must supply it.
    sites = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    if any((Path(site) / "pipeline").is_dir() for site in sites):
        pytest.skip(f"pipeline is installed into {' or '.join(sites)} itself: it cannot be left out")
    launcher = (
        f"import importlib.util, sys; sys.path += {sites!r}; "
        "assert importlib.util.find_spec('pipeline') is None; "
        "from tensorflow_datasets.scripts.cli.main import launch_cli; "
        "sys.argv[0] = 'tfds'; sys.exit(launch_cli())"
    )
    result = tfds_build("datasets/synthetic_em", "--config", "small", "--data_dir", tmp_path,
                        command=[sys.executable, "-I", "-S", "-c", launcher])
    check_built(result, tmp_path / "synthetic_em" / "small" / "1.0.0", {"train": 2, "validation": 1, "test": 1})


def test_isbi2012(tmp_path):
    manual = tmp_path / "manual"
    write_isbi(manual)
    result = tfds_build("datasets/isbi2012", "--manual_dir", manual, "--data_dir", tmp_path / "out")
    check_built(result, tmp_path / "out" / "isbi2012" / "1.0.0", {"train": 3, "validation": 4, "test": 3})


def test_isbi2012_missing_files_show_the_instructions(tmp_path):
    (tmp_path / "manual").mkdir()
    result = tfds_build("datasets/isbi2012", "--manual_dir", tmp_path / "manual", "--data_dir", tmp_path / "out")
    assert result.returncode != 0
    assert "train-labels.tif" in result.stderr and "isbi-2012-segmentation-challenge" in result.stderr
    assert not (tmp_path / "out" / "isbi2012" / "1.0.0").exists()


@pytest.mark.skipif(
    not all((ISBI_DIR / name).is_file() for name in pipeline_data.isbi2012.FILES.values()),
    reason=f"real ISBI 2012 files not found in {ISBI_DIR}",
)
def test_isbi2012_real_data(tmp_path):
    # The command of the issue, on the real challenge files.
    result = tfds_build("datasets/isbi2012", "--manual_dir", ISBI_DIR, "--data_dir", tmp_path)
    builder = check_built(result, tmp_path / "isbi2012" / "1.0.0", {"train": 16, "validation": 4, "test": 30})
    image, label = next(iter(tfds.as_numpy(builder.as_dataset(split="validation", as_supervised=True))))
    assert image.shape == label.shape == (512, 512, 1)


def test_ctc2d(tmp_path):
    write_ctc(tmp_path / "manual", as_zip=True)  # <manual>/PhC-C2DH-U373.zip, as downloaded
    result = tfds_build(
        "datasets/ctc2d", "--config", CTC_NAME, "--manual_dir", tmp_path / "manual", "--data_dir", tmp_path / "out"
    )
    counts = {"train": len(CTC_ANNOTATED["01"]), "validation": len(CTC_ANNOTATED["02"])}
    check_built(result, tmp_path / "out" / "ctc2d" / CTC_NAME / "1.0.0", counts)


def test_image_folder(tmp_path):
    write_image_folder(tmp_path / "manual")
    result = tfds_build("datasets/image_folder", "--manual_dir", tmp_path / "manual", "--data_dir", tmp_path / "out")
    builder = check_built(result, tmp_path / "out" / "image_folder" / "1.0.0", {"train": 3})
    ids = [e["id"].decode() for e in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False))]
    assert ids == ["a", "b", "c"]
