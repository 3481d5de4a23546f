"""Stage `prepare`: load the data set, compute the weight maps, cache everything.

Images are read with the model's channels (`model.input_channels`: colour images need a
`multichannel` data set, see `pipeline.data.load`). The training targets of the train and
val splits are the paper's: touching instances are pulled apart by background separation
borders (`weight_map.separate_instances`, `weight_map.separation` px), and the weight map
is computed from the separated instances. The test split keeps its ground truth as given,
for scoring. Each image's own size is stored as `sizes` (see `pipeline.data`): padding
beyond it gets weight 0, so it never counts in the loss. Where the data set names its
examples, the names are stored as `ids` (text).
"""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np

from pipeline import data
from pipeline.config.schema import Config
from pipeline.console import progress_bar
from pipeline.data.weight_map import separate_instances, weight_map
from pipeline.errors import PipelineError
from pipeline.files import io, rundir
from pipeline.files.rundir import RunDir


def run(config: Config, run: RunDir, overwrite: bool = False) -> None:
    """Writes prepared/{train,val,test}.npz and a manifest into the run directory.

    Data a trained model was trained on is replaced only with `overwrite`, and then that
    model goes with it (the whole train/ folder, workers' backups included), so that the run never holds a model
    beside data and settings it was not trained with. The splits and the manifest appear
    together or not at all.
    """
    trained = run.has_trained_model()
    if trained and not overwrite:
        raise PipelineError(f"{run.best_model}: the run has a trained model; preparing again would replace "
                            "the data it was trained on (pass --overwrite, or use a new --run-dir)")
    splits = data.load(config.data, config.model.input_channels)
    targets = [s for name, s in splits.items() if name != "test" and s.instances is not None]
    progress = progress_bar(sum(len(s.images) for s in targets), "weight map")
    counts, prepared = {}, {}
    for name, split in splits.items():
        sizes = split.sizes if split.sizes is not None else _full_sizes(split.images)
        arrays = {"images": split.images, "sizes": sizes}
        if split.ids is not None:  # e.g. CTC's <sequence>_tNNN, which evaluate groups by sequence
            arrays["ids"] = np.array(split.ids)
        if split.instances is not None and name == "test":
            arrays["instances"] = split.instances
        elif split.instances is not None:
            instances = np.stack([separate_instances(i, config.weight_map.separation) for i in split.instances])
            arrays["instances"] = instances
            arrays["weights"] = np.stack(
                [_weight_map(i, size, config, progress) for i, size in zip(instances, sizes)]
            )
        prepared[name] = arrays
        counts[name] = len(split.images)
    manifest = {"settings": rundir.data_settings(config), "counts": counts}
    run.save_config(config)
    targets = [run.prepared(name) for name in prepared] + [run.manifest]
    with io.atomic_paths(targets, overwrite=True) as temporaries:
        for temporary, arrays in zip(temporaries, prepared.values()):
            io.encode_npz(temporary, arrays)
        temporaries[-1].write_text(json.dumps(manifest, indent=2))
    if trained:
        shutil.rmtree(run.train)
        print(f"notice: the model trained on the replaced data is removed ({run.best_model}); train again")
    shape = "x".join(str(n) for n in splits["train"].images.shape[1:3])
    print(
        f"prepared {config.data.dataset}: "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + f" images of {shape} px -> {run.manifest.parent}"
    )


def _full_sizes(images: np.ndarray) -> np.ndarray:
    return np.tile(np.array(images.shape[1:3], np.int32), (len(images), 1))


def _weight_map(instances: np.ndarray, size: np.ndarray, config: Config, progress: keras.utils.Progbar) -> np.ndarray:
    """The weight map of the image's own area; 0 on the padding."""
    height, width = size
    weights = np.zeros(instances.shape, np.float32)
    weights[:height, :width] = weight_map(
        instances[:height, :width],
        w0=config.weight_map.w0,
        sigma=config.weight_map.sigma,
        balance_classes=config.weight_map.class_balance,
    )
    progress.add(1)
    return weights
