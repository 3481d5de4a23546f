"""Writers for the challenges' submission formats.

- ISBI 2012: one 32-bit float TIFF stack, the probability of **cell** per pixel, the
  slices in the order of `test-volume.tif`.
- Cell Tracking Challenge: a result folder `NN_RES/` with one 16-bit instance label
  image `maskTTT.tif` per frame (0 = background, 1.. = objects).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import io
from pipeline.metrics.common import check_pair


def write_isbi2012(path: Path, probabilities: np.ndarray, overwrite: bool = False) -> Path:
    """Writes probabilities of cell [D, H, W] (or one [H, W]) as an ISBI 2012 submission."""
    probabilities = np.asarray(probabilities, np.float32)
    if probabilities.ndim not in (2, 3):
        raise PipelineError(f"{path}: expected [H, W] or [D, H, W] probabilities, got shape {probabilities.shape}")
    check_pair(probabilities, np.zeros(probabilities.shape, np.uint8))  # in [0, 1], no NaN
    io.write_tiff(path, probabilities, overwrite)
    return Path(path)


def write_ctc_results(folder: Path, instances: np.ndarray, sequence: int = 1, overwrite: bool = False) -> list[Path]:
    """Writes instance labels [T, H, W] as `folder/NN_RES/mask000.tif`, ... (uint16).

    Frame numbers take 3 digits, or 4 from 1000 frames on, as the challenge's tools
    expect. `instances` may also come from `pipeline.inference.labelling.instances.cell_instances(probabilities)`.
    """
    instances = np.asarray(instances)
    if instances.ndim != 3 or instances.dtype.kind not in "biu":
        raise PipelineError(f"{folder}: expected integer instance labels [T, H, W], got {instances.dtype} {instances.shape}")
    if instances.min() < 0 or instances.max() > np.iinfo(np.uint16).max:
        raise PipelineError(f"{folder}: labels must lie in 0..65535 for 16-bit masks")
    digits = 4 if len(instances) >= 1000 else 3
    results = Path(folder) / f"{sequence:02d}_RES"
    paths = [results / f"mask{frame:0{digits}d}.tif" for frame in range(len(instances))]
    io.refuse_existing(paths, overwrite)
    for path, frame in zip(paths, instances):
        io.write_tiff(path, frame.astype(np.uint16), overwrite)
    return paths
