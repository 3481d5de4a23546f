import keras
import numpy as np

from pipeline.config.schema import ModelConfig
from pipeline.metrics.training import training_metrics
from pipeline.training.loss import weighted_cross_entropy
from pipeline.training.model import unet


def test_loss_is_mean_of_weighted_pixel_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 5, 2))
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, 2, size=(2, 5, 5))
    weights = rng.uniform(0, 12, size=(2, 5, 5))
    picked = np.take_along_axis(probabilities, labels[..., None], -1)[..., 0]
    expected = np.mean(weights * -np.log(picked))
    loss = weighted_cross_entropy()(labels, probabilities.astype(np.float32), sample_weight=weights.astype(np.float32))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_zero_weight_pixels_do_not_count():
    probabilities = np.array([[[[0.9, 0.1], [0.2, 0.8]]]], np.float32)  # 1 x 1 x 2 pixels
    labels = np.array([[[1, 1]]])
    weights = np.array([[[0.0, 1.0]]], np.float32)
    loss = weighted_cross_entropy()(labels, probabilities, sample_weight=weights)
    np.testing.assert_allclose(float(loss), -np.log(0.8) / 2, rtol=1e-6)


def test_fit_weights_the_loss_but_not_the_metrics():
    keras.utils.set_random_seed(0)
    model = unet(ModelConfig(depth=2, base_filters=2, dropout=0.0))
    model.compile(optimizer="sgd", loss=weighted_cross_entropy(), metrics=training_metrics(2))
    x = np.random.default_rng(1).normal(size=(2, 26, 26, 1)).astype(np.float32)
    y = np.ones((2, 10, 10), np.int32)
    plain = model.evaluate(x, y, sample_weight=np.ones((2, 10, 10), np.float32), return_dict=True, verbose=0)
    doubled = model.evaluate(x, y, sample_weight=np.full((2, 10, 10), 2.0, np.float32), return_dict=True, verbose=0)
    np.testing.assert_allclose(doubled["loss"], 2 * plain["loss"], rtol=1e-5)
    assert doubled["pixel_accuracy"] == plain["pixel_accuracy"]
    assert doubled["cell_iou"] == plain["cell_iou"]
