"""The clDice term of the loss (Shit et al., CVPR 2021): what the maths guarantees of the soft
skeleton and clDice, that a gap in a membrane costs it what the cross-entropy barely sees, and
that with weight 0 the loss is the paper's."""

import csv
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main
from pipeline.config import resolve as configuration
from pipeline.training.loss import CrossEntropyWithClDice, soft_skeleton, training_loss, weighted_cross_entropy
from pipeline.training.model import compiled_model


def membrane_tile() -> np.ndarray:
    """Labels of a 64 x 64 tile: two cells (1) parted by a membrane (0) 3 px thick."""
    labels = np.ones((1, 64, 64), np.int32)
    labels[0, 31:34, :] = 0
    return labels


def prediction(labels: np.ndarray, wrong: tuple = ()) -> np.ndarray:
    """Probabilities [B, H, W, 2]: 0.9 for the labelled class, 0.1 for the other where `wrong`."""
    membrane = np.where(labels == 0, 0.9, 0.1).astype(np.float32)
    if wrong:
        membrane[wrong] = 0.1
    return np.stack([membrane, 1 - membrane], -1)


def test_a_line_one_pixel_wide_is_its_own_soft_skeleton():
    lines = np.zeros((1, 16, 16, 1), np.float32)
    lines[0, 8, :, 0] = 1  # horizontal
    lines[0, :3, 3, 0] = 1  # vertical
    lines[0, 11 + np.arange(5), np.arange(5), 0] = 1  # diagonal
    np.testing.assert_array_equal(soft_skeleton(lines, 10), lines)


def test_a_thick_bar_thins_to_a_line_inside_it():
    bar = np.zeros((1, 16, 16, 1), np.float32)
    bar[0, 5:10, :, 0] = 1
    skeleton = np.asarray(soft_skeleton(bar, 10))
    assert (skeleton <= bar).all()
    assert (skeleton[0, :, 2:-2, 0].sum(axis=0) == 1).all()  # one pixel across, away from the ends


def test_a_perfect_prediction_scores_clDice_1_so_the_term_adds_nothing():
    labels = membrane_tile()
    perfect = np.stack([labels == 0, labels == 1], -1).astype(np.float32)
    weights = np.ones(labels.shape, np.float32)
    with_term = CrossEntropyWithClDice(0.5, 10)(labels, perfect, sample_weight=weights)
    np.testing.assert_allclose(float(with_term), float(weighted_cross_entropy()(labels, perfect, weights)), atol=1e-6)


def test_a_gap_that_merges_two_cells_costs_clDice_what_a_dent_of_as_many_pixels_does_not():
    labels, weights = membrane_tile(), np.ones((1, 64, 64), np.float32)
    gap = prediction(labels, (0, slice(31, 34), slice(30, 33)))  # 9 px cut through the membrane
    dent = prediction(labels, (0, 31, slice(10, 19)))  # 9 px off its edge: still unbroken
    losses = {}
    for name, probabilities in {"intact": prediction(labels), "gap": gap, "dent": dent}.items():
        cross_entropy = float(weighted_cross_entropy()(labels, probabilities, sample_weight=weights))
        term = float(CrossEntropyWithClDice(1.0, 10)(labels, probabilities, sample_weight=weights)) - cross_entropy
        losses[name] = cross_entropy, term
    np.testing.assert_allclose(losses["gap"][0], losses["dent"][0], rtol=1e-6)  # the same pixels wrong
    assert losses["dent"][1] == pytest.approx(losses["intact"][1], abs=1e-6)
    assert losses["gap"][1] > losses["intact"][1] + 0.01


def test_pixels_of_weight_0_are_left_out_of_clDice():
    # Padding is labelled background (class 0, as membranes are) with weight 0: whatever is
    # predicted there changes nothing.
    labels, weights = membrane_tile(), np.ones((1, 64, 64), np.float32)
    weights[0, :, 48:] = 0
    loss = CrossEntropyWithClDice(1.0, 10)
    predicted = prediction(labels)
    scrambled = predicted.copy()
    scrambled[0, :, 48:] = np.random.default_rng(0).dirichlet([1, 1], size=(64, 16))
    np.testing.assert_allclose(float(loss(labels, scrambled, weights)), float(loss(labels, predicted, weights)),
                               rtol=1e-6)


def test_weight_0_trains_with_the_papers_loss_itself():
    assert training_loss(0.0, 10).get_config() == weighted_cross_entropy().get_config()
    labels = membrane_tile()
    probabilities, weights = prediction(labels, (0, 32, slice(0, 5))), np.ones((1, 64, 64), np.float32)
    assert float(CrossEntropyWithClDice(0.0, 10)(labels, probabilities, weights)) == float(
        weighted_cross_entropy()(labels, probabilities, weights))


@pytest.mark.parametrize("membrane", [0.0, 1.0, 0.5])
def test_gradients_are_finite_even_for_certain_or_empty_maps(membrane):
    labels = membrane_tile() if membrane else np.ones((1, 64, 64), np.int32)  # no membrane at all
    probabilities = tf.Variable(np.stack([np.full((1, 64, 64), membrane), np.full((1, 64, 64), 1 - membrane)], -1)
                                .astype(np.float32))
    with tf.GradientTape() as tape:
        loss = CrossEntropyWithClDice(1.0, 10)(labels, probabilities, np.ones((1, 64, 64), np.float32))
    assert np.isfinite(tape.gradient(loss, probabilities).numpy()).all()


def test_a_model_compiled_with_the_term_saves_and_loads_with_it(tmp_path):
    config = configuration.apply_overrides(configuration.preset("smoke"), {
        "model": {"depth": 2, "base_filters": 2}, "train": {"cldice_weight": 0.3, "cldice_iterations": 4}}, "test")
    model = compiled_model(config)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras").loss
    assert isinstance(loaded, CrossEntropyWithClDice) and (loaded.weight, loaded.iterations) == (0.3, 4)


def test_a_smoke_training_with_the_term_logs_finite_losses(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--preset", "smoke", "--set", "train.steps_per_epoch=4",
            "--set", "train.epochs=2", "--set", "train.cldice_weight=0.5", "--set", "train.cldice_iterations=5"]
    assert main(["--stage", "prepare", *args]) == 0
    assert main(["--stage", "train", *args]) == 0
    with open(run_dir / "train" / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(math.isfinite(float(row[name])) for row in rows for name in ("loss", "val_loss"))
    assert keras.models.load_model(run_dir / "train" / "best.keras").loss.weight == 0.5
