"""The training callbacks, on tiny Keras models: the best model is kept, a NaN loss stops at once and
a collapse at its epoch's end, validation pictures reach TensorBoard, in colour for RGB inputs, the
challenge's errors are evaluate's."""

import dataclasses
import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import resolve as configuration
from pipeline.data.synthetic import synthetic_em_stack
from pipeline.errors import PipelineError
from pipeline.files import model_file
from pipeline.stages.evaluate import evaluate_model
from pipeline.training.callbacks import (
    BestModelCheckpoint, ChallengeScores, HistoryLog, StopOnDivergence, ValidationImages,
)
from pipeline.training.model import unet


def tiny_model() -> keras.Model:
    """One dense layer on two inputs, compiled: enough for callbacks to save and train."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_best_model_is_saved_only_on_improvement_and_across_restarts(tmp_path):
    path, record = tmp_path / "best.keras", tmp_path / "best.json"
    model = tiny_model()
    config = configuration.preset("smoke")
    checkpoint = BestModelCheckpoint(path, record, config)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 2.0})
    best = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in best])
    checkpoint.on_epoch_end(1, {"val_loss": 3.0})  # worse: the file keeps the first weights
    for saved, expected in zip(keras.saving.load_model(path).get_weights(), best):
        np.testing.assert_array_equal(saved, expected)
    assert json.loads(record.read_text()) == {"val_loss": 2.0, "epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.keras"]  # no temporary left behind

    resumed = BestModelCheckpoint(path, record, config)  # a restarted run compares against the record
    resumed.set_model(model)
    resumed.on_epoch_end(2, {"val_loss": 2.5})
    assert json.loads(record.read_text()) == {"val_loss": 2.0, "epoch": 1}
    resumed.on_epoch_end(3, {"val_loss": 1.0})
    assert json.loads(record.read_text()) == {"val_loss": 1.0, "epoch": 4}
    for saved, expected in zip(keras.saving.load_model(path).get_weights(), model.get_weights()):
        np.testing.assert_array_equal(saved, expected)
    assert model_file.trained_config(path) == config  # the settings travel inside the model file


def test_nan_loss_stops_at_its_step_before_the_epoch_ends():
    x = np.ones((6, 2), np.float32)
    x[3] = np.nan  # in the second batch of two
    epoch_ends = []
    callbacks = [StopOnDivergence(), keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_ends.append(epoch))]
    with pytest.raises(PipelineError, match=r"^training diverged: loss is nan at epoch 1, step 2; ") as error:
        tiny_model().fit(x, np.ones((6, 1), np.float32), batch_size=2, epochs=2, shuffle=False, callbacks=callbacks,
                         verbose=0)
    assert "\n" not in str(error.value)
    assert epoch_ends == []  # nothing that saves at an epoch's end ran on the broken weights


def test_a_collapse_stops_at_the_end_of_its_epoch_before_anything_saves_it():
    x, y = np.ones((6, 2), np.float32), np.ones((6, 1), np.float32)
    model = tiny_model()

    def wreck(epoch, logs):  # what a collapse does to the weights, at the third epoch
        if epoch == 2:
            model.set_weights([np.full_like(w, 100.0) for w in model.get_weights()])

    epoch_ends = []
    callbacks = [keras.callbacks.LambdaCallback(on_epoch_begin=wreck), StopOnDivergence(),
                 keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_ends.append(epoch))]
    with pytest.raises(PipelineError, match=r"^training diverged at epoch 3: validation loss .* -> .*, training "
                                            r"loss .* -> .*; the backup of epoch 2 and the best model up to it are kept") as error:
        model.fit(x, y, validation_data=(x, y), batch_size=2, epochs=4, shuffle=False, callbacks=callbacks,
                  verbose=0)
    assert "\n" not in str(error.value)
    assert epoch_ends == [0, 1]


def test_a_collapse_is_the_validation_loss_up_by_half_with_the_training_loss_up_too():
    # Losses of an ISBI run that collapsed late in its 17th epoch in mixed precision, after
    # epochs where one loss alone rose: overfitting (validation only), a noisy training
    # epoch, and both a little.
    guard = StopOnDivergence()
    for epoch, (loss, val_loss) in enumerate([(0.62, 0.44), (0.41, 0.32), (0.41, 0.90), (0.95, 0.33), (0.47, 0.44)]):
        guard.on_epoch_end(epoch, {"loss": loss, "val_loss": val_loss})
    guard.on_epoch_end(5, {"loss": 0.48, "val_loss": 1.01})  # the training loss up by less than a fifth
    guard.on_epoch_end(6, {"loss": 0.58})  # no validation: nothing to confirm
    with pytest.raises(PipelineError, match=r"^training diverged at epoch 8: validation loss 0.32 -> 1.01, "
                                            r"training loss 0.41 -> 0.576; the backup of epoch 7 and the best model "):
        guard.on_epoch_end(7, {"loss": 0.576, "val_loss": 1.01})


def declining(first: float, last: float, epochs: int) -> list[float]:
    """A loss falling from `first` towards `last` as a healthy run's does, reaching it at the last epoch."""
    return [last + (first - last) * (0.9**epoch - 0.9 ** (epochs - 1)) / (1 - 0.9 ** (epochs - 1))
            for epoch in range(epochs)]


def test_a_long_healthy_run_whose_small_losses_rise_by_half_is_not_stopped():
    # The false alarm: after 98 epochs (validation loss down to 0.091, cell IoU 0.96) the
    # validation loss rose to 0.139 at epoch 99 and the training loss by a quarter: ratios
    # of a collapse, at a level far below one.
    guard = StopOnDivergence()
    for epoch, (loss, val_loss) in enumerate(zip(declining(0.62, 0.052, 98), declining(0.44, 0.091, 98))):
        guard.on_epoch_end(epoch, {"loss": loss, "val_loss": val_loss})
    guard.on_epoch_end(98, {"loss": 0.065, "val_loss": 0.139})
    with pytest.raises(PipelineError, match=r"^training diverged at epoch 100: validation loss 0.091 -> 1.01, "):
        guard.on_epoch_end(99, {"loss": 1.1, "val_loss": 1.011})  # a collapse after it is still one


# The recorded collapses (docs/results.md, "A collapse in mixed precision on an Intel Xeon"):
# the epoch, the training and validation losses' ranges in the epochs before, and the
# epoch's own losses.
COLLAPSES = [
    (24, (0.399, 0.414), (0.313, 0.350), (0.820, 1.011)),
    (31, (0.383, 0.394), (0.310, 0.320), (0.821, 1.011)),
    (17, (0.410, 0.429), (0.316, 0.356), (0.576, 1.013)),
]


@pytest.mark.parametrize("collapsed, losses, val_losses, collapse", COLLAPSES, ids=["16 slices", "with validation",
                                                                                  "again"])
def test_each_recorded_collapse_stops_at_its_epoch(collapsed, losses, val_losses, collapse):
    guard = StopOnDivergence()
    guard.on_epoch_end(0, {"loss": 0.62, "val_loss": 0.44})  # a first epoch of those runs
    for epoch in range(1, collapsed - 1):  # then the ends of the recorded ranges in turn
        guard.on_epoch_end(epoch, {"loss": losses[epoch % 2], "val_loss": val_losses[epoch % 2]})
    expected = (f"training diverged at epoch {collapsed}: validation loss {val_losses[0]:.3g} -> {collapse[1]:.3g}, "
                f"training loss {losses[0]:.3g} -> {collapse[0]:.3g}; the backup of epoch {collapsed - 1} ")
    with pytest.raises(PipelineError, match=f"^{re.escape(expected)}"):
        guard.on_epoch_end(collapsed - 1, {"loss": collapse[0], "val_loss": collapse[1]})


def test_a_resumed_history_drops_the_rows_of_the_repeated_epochs_whole_or_cut_short(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_loss\r\n0,0.5,0.4\r\n1,0.4,0.3\r\n2,0.35,0.3\r\n3,0.3")  # the disk filled up
    log = HistoryLog(path, resumed_epoch=2)  # the backup holds 2 finished epochs: 2 and 3 (0-based) come again
    log.on_train_begin()
    for epoch in (2, 3):
        log.on_epoch_end(epoch, {"loss": 0.25, "val_loss": 0.2})
    log.on_train_end()
    assert path.read_bytes().decode() == ("epoch,loss,val_loss\r\n0,0.5,0.4\r\n1,0.4,0.3\r\n2,0.25,0.2\r\n3,0.25,0.2\r\n")


def logged_images(log_dir) -> dict[str, np.ndarray]:
    """The pictures a TensorBoard log holds, by tag, decoded from their PNGs."""
    images = {}
    for events in sorted((log_dir / "images").iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                encoded = tf.make_ndarray(value.tensor)[2]  # [width, height, PNG]
                images[value.tag] = tf.image.decode_png(encoded).numpy()
    return images


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_validation_input_is_shown_in_colour_for_rgb_and_by_its_first_channel_else(tmp_path, channels):
    # A square in the first channel, the rest in the second: red on green for RGB. The
    # output window is the centre 8 x 8 of the 12 x 12 tile.
    tile = np.zeros((12, 12, channels), np.float32)
    tile[4:8, 4:8, 0] = 1.0
    if channels > 1:
        tile[..., 1] = 1.0 - tile[..., 0]
    label = np.zeros((8, 8), np.int32)
    model = keras.Sequential([keras.Input((12, 12, channels)), keras.layers.Cropping2D(2), keras.layers.Conv2D(2, 1)])
    callback = ValidationImages(tmp_path, tile, label, np.ones((8, 8), np.float32))
    callback.set_model(model)
    callback.on_epoch_end(0)
    shown = logged_images(tmp_path)["validation/input"]
    if channels == 3:
        assert shown.shape == (8, 8, 3)
        np.testing.assert_array_equal(shown[2:6, 2:6, 0], 255)  # red square
        np.testing.assert_array_equal(shown[0, 0], [0, 255, 0])  # on green
    else:
        assert shown.shape == (8, 8, 1)
        np.testing.assert_array_equal(shown[..., 0], 255 * tile[2:10, 2:10, 0])  # white square on black


@pytest.mark.parametrize("method", ["components", "watershed"])
def test_challenge_scores_are_the_errors_evaluate_reports(method):
    config = configuration.preset("smoke")
    config = dataclasses.replace(config, predict=dataclasses.replace(config.predict, instances=method))
    keras.utils.set_random_seed(3)
    model = unet(config.model)
    images, instances = synthetic_em_stack(2, 96, seed=1)
    images, cells = images[..., None], instances > 0
    scores, logs = ChallengeScores(images, cells, None, config), {}
    scores.set_model(model)
    scores.on_epoch_end(0, logs)
    report = evaluate_model(model, images, cells, config)
    assert logs == {"val_rand_error": report["rand_error"], "val_warping_error": report["warping_error"]}
    assert report["segmentation"] == method
