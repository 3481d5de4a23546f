"""The Keras metrics of training: the streaming pixel error equals the evaluation's, and saved models keep it."""

import keras
import numpy as np
import pytest

from pipeline.metrics.isbi import pixel_error
from pipeline.metrics.training import PixelError, training_metrics


def test_streaming_pixel_error_equals_the_reference_over_batches():
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 2, size=(3, 2, 16, 16))
    cell = rng.uniform(size=(3, 2, 16, 16)).astype(np.float32)
    cell[0, 0, :4] = 0.5  # on a grid value: strict comparison in double decides
    metric = PixelError()
    for labels, probability in zip(truth, cell):
        metric.update_state(labels, np.stack([1 - probability, probability], -1))
    expected, _ = pixel_error(cell.reshape(6, 16, 16), truth.reshape(6, 16, 16))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-7)
    metric.reset_state()
    metric.update_state(truth[0], np.stack([1 - truth[0], truth[0]], -1).astype(np.float32))
    assert float(metric.result()) == 0.0


def test_saved_models_find_the_pixel_error_by_its_registered_name(tmp_path):
    # `.keras` files saved before the metrics became a package name the class "unet>PixelError".
    assert keras.saving.get_registered_name(PixelError) == "unet>PixelError"
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 1, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=training_metrics(2))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    labels = np.ones((1, 4, 4), np.int32)
    scores = loaded.evaluate(np.ones((1, 4, 4, 1), np.float32), labels, return_dict=True, verbose=0)
    assert set(scores) == {"loss", "pixel_accuracy", "cell_iou", "pixel_error"}
