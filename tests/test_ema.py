"""Weight averaging (train.ema_momentum): validation, best.keras and last.keras are the moving
average of the weights, the average does not steer the training, the multi-worker loop ends as
model.fit does, and a resumed run keeps the average."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.config.schema import Config
from pipeline.files.rundir import RunDir
from pipeline.training import callbacks
from pipeline.training.callbacks import AveragedWeights, BestModelCheckpoint
from pipeline.training.distribution import fit_distributed
from pipeline.training.model import compiled_model

QUICK = ["--preset", "smoke", "--set", "train.steps_per_epoch=4", "--set", "model.dropout=0.0"]
EPOCHS, STEPS = 2, 2


def tiny_config(ema_momentum: float) -> Config:
    return configuration.apply_overrides(configuration.preset("smoke"), {
        "model": {"depth": 2, "base_filters": 2, "dropout": 0.0},
        "train": {"ema_momentum": ema_momentum, "epochs": EPOCHS, "steps_per_epoch": STEPS}}, "test")


def tiles() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.normal(size=(4, 26, 26, 1)).astype(np.float32), rng.integers(0, 2, (4, 10, 10)).astype(np.int32),
            rng.uniform(0.5, 2, (4, 10, 10)).astype(np.float32))


class Trajectory(keras.callbacks.Callback):
    """The weights the optimizer produced, after every step."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append([keras.ops.convert_to_numpy(v) for v in self.model.trainable_weights])


def trained(config: Config, path: Path, distributed: bool = False) -> tuple[keras.Model, list, dict]:
    """A tiny U-Net trained under MirroredStrategy, best.keras kept every epoch: the model,
    its weights after every step, and the history."""
    keras.utils.set_random_seed(0)
    data = tf.data.Dataset.from_tensor_slices(tiles()).batch(2)
    distribution = tf.distribute.MirroredStrategy()
    with distribution.scope():
        model = compiled_model(config)
    trajectory = Trajectory()
    averaged = AveragedWeights()
    chosen = [averaged, trajectory, BestModelCheckpoint(path, path.with_suffix(".json"), config, last=True),
              averaged.restorer()]
    if distributed:
        history = fit_distributed(model, distribution, data.repeat(), data, config.train, chosen, 0)
    else:
        history = model.fit(data.repeat(), epochs=EPOCHS, steps_per_epoch=STEPS, validation_data=data,
                            callbacks=chosen, verbose=0)
    return model, trajectory.steps, history.history


def moving_average(steps: list[list[np.ndarray]], momentum: float) -> list[np.ndarray]:
    """Keras' average: the first step's weights, then momentum x average + (1 - momentum) x weights."""
    average = steps[0]
    for weights in steps[1:]:
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
    return average


def assert_weights_close(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for a, b in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_saved_and_scored_models_are_the_average_of_the_trained_weights(tmp_path):
    model, steps, history = trained(tiny_config(0.5), tmp_path / "best.keras")
    plain_model, plain_steps, _ = trained(tiny_config(0.0), tmp_path / "plain.keras")
    assert len(steps) == EPOCHS * STEPS
    for averaged_run, plain_run in zip(steps, plain_steps, strict=True):  # the average steers nothing
        assert_weights_close(averaged_run, plain_run)
    average = moving_average(steps, 0.5)
    assert not np.allclose(average[0], steps[-1][0], rtol=1e-3)  # the test tells the two apart
    saved = keras.models.load_model(tmp_path / "best.keras")
    assert_weights_close(saved.trainable_weights, average)
    assert_weights_close(model.trainable_weights, average)  # what last.keras saves
    x, y, w = tiles()
    scored = saved.evaluate(x, y, sample_weight=w, batch_size=2, return_dict=True, verbose=0)
    np.testing.assert_allclose(history["val_loss"][-1], scored["loss"], rtol=1e-5)
    assert_weights_close(plain_model.trainable_weights, plain_steps[-1])  # off: the trained weights themselves


def test_the_multi_worker_loop_averages_as_model_fit_does(tmp_path):
    config = tiny_config(0.5)
    fitted, _, fit_history = trained(config, tmp_path / "fit.keras")
    looped, _, loop_history = trained(config, tmp_path / "loop.keras", distributed=True)
    assert_weights_close(looped.trainable_weights, fitted.trainable_weights)
    assert_weights_close(keras.models.load_model(tmp_path / "loop.keras").trainable_weights,
                         keras.models.load_model(tmp_path / "fit.keras").trainable_weights)
    np.testing.assert_allclose(loop_history["val_loss"], fit_history["val_loss"], rtol=1e-5)


@pytest.mark.parametrize("selection", ["val_loss", "val_rand_error"])
def test_the_average_is_in_the_model_from_validation_to_just_before_the_backup(tmp_path, selection):
    # What test_the_saved_and_scored_models_are_the_average_of_the_trained_weights checks
    # holds for this order: the challenge scores, the checkpoint, early stopping among the
    # callbacks between, and the backup, with the trained weights, after them.
    config = configuration.apply_overrides(tiny_config(0.9), {"train": {
        "select_by": selection, "early_stopping_patience": 2}}, "test")
    tile = (np.zeros((26, 26, 1), np.float32), np.zeros((10, 10), np.int32), np.ones((10, 10), np.float32))
    val_split = {"images": np.zeros((1, 10, 10, 1), np.float32), "instances": np.zeros((1, 10, 10), np.int32)}
    chosen = callbacks.run_callbacks(config, RunDir(tmp_path), None, tile, val_split)
    averaged = chosen[0]
    assert isinstance(averaged, AveragedWeights)
    assert isinstance(chosen[-1], keras.callbacks.BackupAndRestore)
    assert isinstance(chosen[-2], callbacks.EpochTimes)  # times the epoch's callbacks too, the average's among them
    assert isinstance(chosen[-4], keras.callbacks.EarlyStopping)
    restorer = chosen[-3]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    for callback in (averaged, restorer):
        callback.set_model(model)
    averaged.trained = []  # as if the average were in: the restorer is the averaged weights' own
    restorer.on_epoch_end(0)
    assert averaged.trained is None
    plain = configuration.apply_overrides(config, {"train": {"ema_momentum": 0.0}}, "test")
    assert [type(c) for c in callbacks.run_callbacks(plain, RunDir(tmp_path), None, tile, val_split)] == [
        type(c) for c in chosen[1:-3] + chosen[-2:]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    assert main(["--stage", "prepare", "--run-dir", str(run_dir), *QUICK]) == 0
    return run_dir


def test_a_run_failing_while_the_average_is_in_the_model_resumes_like_an_uninterrupted_one(
        prepared, tmp_path, monkeypatch):
    import shutil

    args = [*QUICK, "--set", "train.epochs=3", "--set", "train.ema_momentum=0.8"]
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    for run_dir in (straight, failed):
        shutil.copytree(prepared, run_dir)
    assert main(["--stage", "train", "--run-dir", str(straight), *args]) == 0

    class FailsOnce(callbacks.ValidationImages):  # after best.keras, before the backup: the average is in
        failures: list[int] = []

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1 and not self.failures:
                self.failures.append(epoch)
                raise OSError(28, "No space left on device")
            super().on_epoch_end(epoch, logs)

    monkeypatch.setattr(callbacks, "ValidationImages", FailsOnce)
    assert main(["--stage", "train", "--run-dir", str(failed), *args]) == 2
    assert main(["--stage", "train", "--run-dir", str(failed), *args]) == 0
    for name in ("last.keras", "best.keras"):
        assert_weights_close(keras.models.load_model(failed / "train" / name).get_weights(),
                             keras.models.load_model(straight / "train" / name).get_weights())
