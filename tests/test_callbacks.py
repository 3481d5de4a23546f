"""The training callbacks, on a tiny Keras model: the best model is kept, a NaN loss stops at once."""

import json

import keras
import numpy as np
import pytest

from pipeline.callbacks import BestModelCheckpoint, StopOnNaN
from pipeline.errors import PipelineError


def tiny_model() -> keras.Model:
    """One dense layer on two inputs, compiled: enough for callbacks to save and train."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_best_model_is_saved_only_on_improvement_and_across_restarts(tmp_path):
    path, record = tmp_path / "best.keras", tmp_path / "best.json"
    model = tiny_model()
    checkpoint = BestModelCheckpoint(path, record)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 2.0})
    best = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in best])
    checkpoint.on_epoch_end(1, {"val_loss": 3.0})  # worse: the file keeps the first weights
    for saved, expected in zip(keras.saving.load_model(path).get_weights(), best):
        np.testing.assert_array_equal(saved, expected)
    assert json.loads(record.read_text()) == {"val_loss": 2.0, "epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.keras"]  # no temporary left behind

    resumed = BestModelCheckpoint(path, record)  # a restarted run compares against the record
    resumed.set_model(model)
    resumed.on_epoch_end(2, {"val_loss": 2.5})
    assert json.loads(record.read_text()) == {"val_loss": 2.0, "epoch": 1}
    resumed.on_epoch_end(3, {"val_loss": 1.0})
    assert json.loads(record.read_text()) == {"val_loss": 1.0, "epoch": 4}
    for saved, expected in zip(keras.saving.load_model(path).get_weights(), model.get_weights()):
        np.testing.assert_array_equal(saved, expected)


def test_nan_loss_stops_at_its_step_before_the_epoch_ends():
    x = np.ones((6, 2), np.float32)
    x[3] = np.nan  # in the second batch of two
    epoch_ends = []
    callbacks = [StopOnNaN(), keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_ends.append(epoch))]
    with pytest.raises(PipelineError, match=r"^training diverged: loss is nan at epoch 1, step 2; ") as error:
        tiny_model().fit(x, np.ones((6, 1), np.float32), batch_size=2, epochs=2, shuffle=False, callbacks=callbacks,
                         verbose=0)
    assert "\n" not in str(error.value)
    assert epoch_ends == []  # nothing that saves at an epoch's end ran on the broken weights
