"""Prediction outputs that two processes wrote, compared as far as the arithmetic promises.

Another process may add a kernel's partial sums in another order (CI runs under load, and on
another CPU, differed in the last bit of some probabilities), so the probabilities, and the
mean probability each object's measurements give, agree to float rounding; the masks, labels
and overlays made from them byte for byte.
"""

import csv
from pathlib import Path

import numpy as np
import tifffile


def files_of(folder: Path) -> dict[str, bytes]:
    """{name: bytes} of every file in a folder, hidden ones (temporaries) included."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_same_outputs(ours: Path, theirs: Path) -> None:
    """The files of prediction folders `ours` and `theirs` are the same ones, with the same contents
    up to float rounding in probabilities (see the module doc)."""
    mine, other = files_of(ours), files_of(theirs)
    assert set(mine) == set(other)
    for name in mine:
        if name.endswith("_prob.tif"):
            np.testing.assert_allclose(tifffile.imread(ours / name), tifffile.imread(theirs / name), rtol=0, atol=1e-6)
        elif name.endswith(".csv"):
            rows, expected = (list(csv.reader(files[name].decode().splitlines())) for files in (mine, other))
            assert rows[0] == expected[0] and len(rows) == len(expected), name
            np.testing.assert_allclose(np.array(rows[1:], float), np.array(expected[1:], float), rtol=0, atol=2e-6)
        else:
            assert mine[name] == other[name], name
