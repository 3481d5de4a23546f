"""Keras callbacks of the training stage: what Keras' own ones do not do for us, and the list a run trains with.

They run on every Keras backend: what needs TensorFlow (the TensorBoard writers, the
overlap-tile segmenter of `inference`) is imported where it is used, and on Keras' JAX and
PyTorch backends, whose training has no TensorFlow (`training.portable`), the challenge
scores predict with `WholeImage` and the run writes no TensorBoard logs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import typing
from pathlib import Path

import cv2
import keras
import numpy as np

from pipeline import mirror, sizes
from pipeline.config.schema import Config, TrainConfig
from pipeline.display import grey8
from pipeline.errors import PipelineError
from pipeline.files import io, model_file, rundir
from pipeline.files.rundir import RunDir
from pipeline.metrics.common import Sweep
from pipeline.metrics.isbi import rand_error_sweep
from pipeline.metrics.warping import warping_error_sweep
from pipeline.normalization import normalize_array


class StopOnDivergence(keras.callbacks.Callback):
    """Stops training when it diverges, with a message naming where.

    Two signs: a NaN or infinite loss at any step, and a collapse at an epoch's end: the
    validation loss at least 1.5 times its lowest so far and at least `collapsed_loss`,
    while the training loss rose too, to at least 1.2 times its lowest. A collapsed network
    predicts one class everywhere and does not come back (ISBI runs in mixed precision on
    an Intel Xeon: the validation loss tripled within one epoch, to 1.011-1.013, and stayed
    there). The training loss is an epoch's mean, so a collapse late in an epoch raises it
    less: from 0.4 to 1.1, as in those runs, 1.2 catches one in the first 88% of the epoch,
    and a later one at the next epoch's end. Overfitting raises the validation loss alone,
    and an epoch's noise moves the two together by a few percent.

    The ratios alone also stop a healthy run late in training, where the losses are small
    and a few hundredths are a large ratio: a validation loss of 0.091 -> 0.139 at epoch 99
    with the training loss 1.2 times its lowest, while the cell IoU was 0.96. Hence the
    level too: ln 2 = 0.693 is about the lowest validation loss of a network that ignores
    its input, as a collapsed one does. The class-balancing weights give each class half
    the weight, so one prediction for every pixel loses at least ln 2 (the border term
    only adds to it), while a network that segments lies well below it from its first
    epoch on (0.31-0.44 on ISBI). Without class balance and border term
    (`weight_map.class_balance=false`, `weight_map.w0=0`) the least is the entropy of the
    class frequencies, below ln 2: a collapse to those would go unnoticed.

    It raises instead of setting `stop_training`, so that no epoch-end callback runs on
    the broken weights: the last backup and the best model stay those of the epoch before.
    """

    def __init__(self, validation_factor: float = 1.5, training_factor: float = 1.2,
                 collapsed_loss: float = math.log(2)):
        super().__init__()
        self.factors = {"val_loss": validation_factor, "loss": training_factor}
        self.collapsed_loss = collapsed_loss
        self.lowest: dict[str, float] = {}

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise PipelineError(
                f"training diverged: loss is {float(loss)} at epoch {self.epoch + 1}, step {batch + 1}; "
                "the last good model and backup are kept (try a lower train.learning_rate)"
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        losses = {name: float(logs[name]) for name in self.factors if name in (logs or {})}
        if len(losses) < 2:
            return  # a training loss that rises alone is no proof
        if self.lowest and self._collapsed(losses):
            raise PipelineError(
                f"training diverged at epoch {epoch + 1}: validation loss {self.lowest['val_loss']:.3g} -> "
                f"{losses['val_loss']:.3g}, training loss {self.lowest['loss']:.3g} -> {losses['loss']:.3g}; "
                f"the backup of epoch {epoch} and the best model up to it are kept (try float32, a lower "
                "train.learning_rate or a train.clipnorm)"
            )
        self.lowest = {name: min(value, self.lowest.get(name, math.inf)) for name, value in losses.items()}

    def _collapsed(self, losses: dict[str, float]) -> bool:
        risen = all(losses[name] >= factor * self.lowest[name] for name, factor in self.factors.items())
        return risen and losses["val_loss"] >= self.collapsed_loss


class BestModelCheckpoint(keras.callbacks.Callback):
    """Saves the model with the lowest `monitor` value, atomically, surviving restarts.

    Unlike `keras.callbacks.ModelCheckpoint`, the `.keras` file is written under a
    temporary name and renamed into place, so a killed run never leaves it half-written,
    and it carries the training's `config` inside (`model_file`); the best value so far is
    kept beside it, so a resumed run keeps comparing against it.
    """

    def __init__(self, path: Path, record: Path, config: Config, monitor: str = "val_loss", last: bool = False):
        super().__init__()
        self.path, self.record, self.monitor, self.last = Path(path), Path(record), monitor, last
        self.config = config
        self.best = json.loads(self.record.read_text())[monitor] if self.record.exists() else math.inf

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Saves on improvement, or at every epoch with `last` (nothing held out to compare on)."""
        value = float((logs or {}).get(self.monitor, math.inf))
        if value < self.best or self.last:
            self.best = value
            with io.atomic_path(self.path, overwrite=True) as temporary:
                model_file.save(self.model, temporary, self.config)
            io.atomic_write_text(self.record, json.dumps({self.monitor: value, "epoch": epoch + 1}))


class AveragedWeights(keras.callbacks.Callback):
    """With `train.ema_momentum`: the moving average of the weights, which the optimizer
    keeps (`schedule.optimizer`), is the model that each epoch's validation and epoch-end
    callbacks see: the validation loss, the challenge scores, the pictures, best.keras and
    early stopping's best weights are the average's.

    It goes first in the callback list and puts the average into the model when validation
    begins (or at the epoch's end, if nothing was validated); its `restorer` goes just
    before the backup and puts the weights the optimizer steps from back. The backup so
    holds those and, among the optimizer's variables, the average, as uninterrupted
    training has them, and a resumed run goes on exactly. At the end `model.fit` (and
    `distribution.fit_distributed`) puts the average into the model for good, so that
    last.keras is the average too (`finalize_variable_values`).
    """

    def __init__(self):
        super().__init__()
        self.trained: list[np.ndarray] | None = None  # the optimizer's weights while the average is in the model

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.put_average_in()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.put_average_in()

    def put_average_in(self) -> None:
        """Keeps the trained weights aside and gives the model the average, unless it has it."""
        if self.trained is None:
            self.trained = [keras.ops.convert_to_numpy(variable) for variable in self.model.trainable_weights]
            self.model.optimizer.finalize_variable_values(self.model.trainable_weights)

    def put_trained_back(self) -> None:
        """Gives the model back the weights the optimizer steps from, exactly."""
        if self.trained is not None:
            for variable, value in zip(self.model.trainable_weights, self.trained):
                variable.assign(value)
            self.trained = None

    def restorer(self) -> keras.callbacks.Callback:
        """The callback that puts the trained weights back at the end of each epoch."""
        return keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs=None: self.put_trained_back())


class HistoryLog(keras.callbacks.CSVLogger):
    """Keras' CSVLogger appending to `path`, which keeps one row per epoch across resumes.

    The backup is the last callback of an epoch, so a run that fails (a disk filling up)
    or is killed during an epoch's callbacks resumes at that epoch: the rows of it and
    later, whole or cut short, are dropped before training goes on, and written again.
    """

    def __init__(self, path: Path, resumed_epoch: int):
        super().__init__(str(path), append=True)
        self.path, self.resumed_epoch = Path(path), resumed_epoch

    def on_train_begin(self, logs: dict | None = None) -> None:
        _keep_rows_before(self.path, self.resumed_epoch)
        super().on_train_begin(logs)


def _keep_rows_before(path: Path, epoch: int) -> None:
    """Keeps the header and the whole rows of the epochs before `epoch` (0-based, as logged)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle)) or [[]]
    kept = [row for row in rows if len(row) == len(header) and row[0].isdigit() and int(row[0]) < epoch]
    if kept == rows:
        return
    if not kept:  # the header too, which may be the part cut short: CSVLogger writes it again
        path.unlink()
        return
    with io.atomic_path(path, overwrite=True) as temporary, open(temporary, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *kept])


class EpochTimes(keras.callbacks.Callback):
    """Writes the wall time of every finished epoch, its callbacks' work included, to `path`
    (JSON: {"epoch_seconds": [...]}), kept across resumes as the history is: the epochs from the
    resumed one on are dropped and timed again. What a run's training took, however often it
    was killed: the cross-validation's minutes per fold. An epoch finished by a version that
    did not time epochs is null, so that a sum never passes for the whole training's.
    """

    def __init__(self, path: Path, resumed_epoch: int):
        super().__init__()
        self.path, self.resumed_epoch = Path(path), resumed_epoch
        self.seconds: list[float | None] = []
        self.start = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        recorded = rundir.epoch_seconds(self.path)
        self.seconds = (recorded + [None] * self.resumed_epoch)[: self.resumed_epoch]

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.monotonic() - self.start)
        io.atomic_write_text(self.path, json.dumps({"epoch_seconds": self.seconds}))


class ChallengeScores(keras.callbacks.Callback):
    """Adds the ISBI challenge's Rand and warping errors of the whole validation images to
    every epoch's logs, as `val_rand_error` and `val_warping_error`.

    The weighted loss on validation tiles is what training minimises, not what the
    challenge ranks: this lets `train.select_by` keep the epoch the challenge would rank
    best. The images are predicted as `evaluate` predicts them (overlap-tile, without
    test-time augmentation, which would cost 8 passes) and each error is the best over
    the challenge's thresholds, of the cells as `predict.instances` separates them, as
    `evaluate` reports it.
    """

    def __init__(self, images: np.ndarray, cells: np.ndarray, sizes: np.ndarray | None, config: Config):
        super().__init__()
        sizes = [image.shape[:2] for image in images] if sizes is None else sizes
        self.images = [image[:height, :width] for image, (height, width) in zip(images, sizes)]
        self.cells = [truth[:height, :width] for truth, (height, width) in zip(cells, sizes)]
        self.config = config
        self.segment = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.segment is None:  # built once: its graph reads the weights as they are at each call
            self.segment = _segmenter(self.model, self.config)
        probabilities = [self.segment(image) for image in self.images]
        if logs is not None:
            method = self.config.predict.instances  # the cells as evaluate separates them
            logs["val_rand_error"] = _best(rand_error_sweep, probabilities, self.cells, method)
            logs["val_warping_error"] = _best(warping_error_sweep, probabilities, self.cells, method)


def _segmenter(model: keras.Model, config: Config) -> typing.Callable[[np.ndarray], np.ndarray]:
    """Probability of cell [H, W] of a whole image [H, W, C], as `evaluate` predicts without
    test-time augmentation: `inference.segmenter` on TensorFlow, `WholeImage` on the other backends."""
    if keras.backend.backend() != "tensorflow":
        return WholeImage(model, config)
    # Imported here: it is TensorFlow, which Keras' JAX and PyTorch backends train without.
    from pipeline.inference.segmenter import Segmenter

    plain = dataclasses.replace(config.predict, test_time_augmentation=False)
    return Segmenter(model, dataclasses.replace(config, predict=plain))


class WholeImage:
    """Probability of cell of a whole image in one pass of the network, without TensorFlow (for
    the challenge scores on Keras' JAX and PyTorch backends).

    The image is normalised (`normalize_array`) and mirror-padded by the context before and up
    to the next valid input size after: its pooling grid is the overlap-tile grid's, whose
    tiles start at multiples of the alignment from the same corner, and an output pixel sees
    only the context around it, so the result is the tiled one (up to float rounding), with
    one compiled shape per image size. The whole image's activations must fit the device.
    """

    def __init__(self, model: keras.Model, config: Config):
        self.model, self.depth, self.padding = model, config.model.depth, config.model.padding

    def __call__(self, image: np.ndarray) -> np.ndarray:
        margin = sizes.context(self.depth, self.padding)
        height, width = image.shape[:2]
        sides = [sizes.valid_input_sizes(self.depth, side + 2 * margin, side + 2 * margin + sizes.alignment(self.depth),
                                         self.padding)[0] for side in (height, width)]
        pads = [(margin, side - size - margin) for side, size in zip(sides, (height, width))]
        padded = mirror.mirror_pad_array(normalize_array(image), pads)
        # predict_on_batch: the backend's compiled inference step (XLA on JAX), not op by op.
        probabilities = self.model.predict_on_batch(padded[None])
        return np.asarray(probabilities[0, :height, :width, 1], np.float32)


def _best(sweep: typing.Callable[[np.ndarray, np.ndarray, str], Sweep], probabilities: list[np.ndarray],
          cells: list[np.ndarray], method: str) -> float:
    """The lowest error over the thresholds, of the cells as `method` separates them: of the stack
    (the challenge's sums over slices) or, for images of different sizes, of the mean per threshold."""
    if len({p.shape for p in probabilities}) == 1:
        return sweep(np.stack(probabilities), np.stack(cells), method).error
    return float(np.min(np.mean([sweep(p, c, method).errors for p, c in zip(probabilities, cells)], axis=0)))


class ValidationImages(keras.callbacks.Callback):
    """Writes a fixed validation tile to TensorBoard after every epoch.

    Input, ground truth, weight map (colour-mapped), predicted probability of cell and
    mask, so that a user sees what the network learns, not only how the loss falls. The
    input is shown in colour where it has 3 channels (RGB), else its first channel.
    """

    def __init__(self, log_dir: Path, tile: np.ndarray, label: np.ndarray, weight: np.ndarray):
        super().__init__()
        import tensorflow as tf  # here: TensorBoard's writer, which the other Keras backends do without

        self.summary = tf.summary
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / "images"))
        self.tile = tile[None]
        out = label.shape[0]
        margin = (tile.shape[0] - out) // 2
        shown = slice(None) if tile.shape[-1] == 3 else slice(0, 1)
        centre = tile[margin : margin + out, margin : margin + out, shown]
        self.fixed = {
            # One range for all channels, as the tile was normalised: the colours keep their balance.
            "input": grey8(centre, (centre.min(), centre.max())),
            "ground_truth": label[..., None].astype(np.float32),
            "weight_map": _colour_mapped(weight),
        }

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        probability = self.model(self.tile, training=False)[0, ..., 1:2].numpy()
        images = dict(self.fixed, probability=probability, mask=(probability > 0.5).astype(np.float32))
        with self.writer.as_default(step=epoch):
            for name, image in images.items():
                self.summary.image(f"validation/{name}", image[None])
        self.writer.flush()


def _colour_mapped(weight: np.ndarray) -> np.ndarray:
    """[H, W] weights -> [H, W, 3] RGB in [0, 1] (viridis: dark = low, yellow = high)."""
    # The full range, not percentiles: the few highest weights, in the gaps between
    # touching cells, are what the picture is there to show.
    grey = grey8(weight, (weight.min(), weight.max()))
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB).astype(np.float32) / 255


def resumed_epoch(backup_dir: Path) -> int:
    """Epochs finished by an interrupted run, from BackupAndRestore's own record (0 if none)."""
    record = Path(backup_dir) / "training_metadata.json"
    if not record.exists():
        return 0
    try:
        return int(json.loads(record.read_text())["epoch"])
    except (ValueError, KeyError, TypeError):  # written by Keras in place: a full disk can cut it short
        raise PipelineError(f"{record}: the backup of the interrupted training is damaged; start the training "
                            "again with --overwrite") from None


def run_callbacks(
    config: Config, run: RunDir, task_id: int | None, val_tile: tuple[np.ndarray, ...], val_split: dict
) -> list[keras.callbacks.Callback]:
    """Backup and divergence guard on every worker; checkpoints and logs on the chief only.

    The challenge scores, when they choose the model, come first: the callbacks after
    them read them from the same epoch's logs (every worker, as early stopping needs them).
    The backup comes last: an epoch counts as finished only once everything else of it is
    written, so a run that fails in any of them (a disk filling up) resumes at that epoch.
    With `train.ema_momentum` everything between the two is given the averaged weights
    (`AveragedWeights`).
    """
    backup = run.backup(task_id)
    chosen: list[keras.callbacks.Callback] = [StopOnDivergence()]
    if config.train.select_by in ("val_rand_error", "val_warping_error"):
        chosen.insert(0, ChallengeScores(val_split["images"], val_split["instances"] > 0, val_split.get("sizes"),
                                         config))
    averaged = AveragedWeights() if config.train.ema_momentum else None
    if averaged is not None:
        chosen.insert(0, averaged)
    if task_id is None:
        chosen += [
            BestModelCheckpoint(run.best_model, run.best_record, config, recorded_score(config.train),
                                last=keeps_last_epoch(config.train)),
            HistoryLog(run.history, resumed_epoch(backup)),
        ]
        if keras.backend.backend() == "tensorflow":  # TensorBoard's writers are TensorFlow's
            chosen += [keras.callbacks.TensorBoard(log_dir=str(run.logs)), ValidationImages(run.logs, *val_tile)]
    if config.train.early_stopping_patience:
        chosen.append(keras.callbacks.EarlyStopping(
            config.train.select_by, patience=config.train.early_stopping_patience, restore_best_weights=True))
    if averaged is not None:
        chosen.append(averaged.restorer())
    if task_id is None:  # last but the backup: an epoch's time includes its callbacks' work
        chosen.append(EpochTimes(run.epoch_times, resumed_epoch(backup)))
    return chosen + [keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True)]


def keeps_last_epoch(train: TrainConfig) -> bool:
    """Whether best.keras is the last epoch's model: nothing held out chose it."""
    return train.include_validation or train.select_by == "last"


def recorded_score(train: TrainConfig) -> str:
    """The validation score recorded beside best.keras (the loss where nothing is selected by a score)."""
    return "val_loss" if train.select_by == "last" else train.select_by
