"""The evaluation report: scores per image and overall, warnings, SEG per sequence, table and panel."""

import numpy as np
import pytest

from fakes import CTC_ANNOTATED, write_ctc
from pipeline.data.ctc2d import read_sequence
from pipeline.metrics.ctc import cell_instances, seg
from pipeline.report import COLOURS, panel, report_for, table

NO_MEMBRANE = "ground truth has no membrane pixels; warping, Rand and pixel errors, 1-Vrand and 1-Vinfo are 0"
NO_CELL = "ground truth has no cell pixels; Rand and warping errors, 1-Vrand and 1-Vinfo are 0 by definition"


def _two_cells() -> tuple[np.ndarray, np.ndarray]:
    """A ground truth of two cells and a prediction with an extra membrane across one of them."""
    truth = np.ones((16, 16), bool)
    truth[:, 7] = False
    probability = np.where(truth, 0.9, 0.1).astype(np.float32)
    probability[8, :7] = 0.1
    return probability, truth


@pytest.mark.parametrize("label, truth, message", [
    ("all cell", np.ones((16, 16), bool), NO_MEMBRANE),
    ("all membrane", np.zeros((16, 16), bool), NO_CELL),
])
def test_ground_truth_without_membrane_or_cells_is_warned_about(label, truth, message):
    probability, normal = _two_cells()
    report = report_for([probability, probability], [normal, truth], 0.5)
    # The same prediction, with its wrong membrane, scores perfectly against the degenerate truth.
    assert report["per_image"][0]["rand_error"] > 0
    assert report["per_image"][1]["rand_error"] == report["per_image"][1]["warping_error"] == 0.0
    assert [line.split(";")[0] for line in report["warnings"]] == [f"image 1: {message.split(';')[0]}"]
    assert report["warnings"][0].startswith(f"image 1: {message}")
    assert report["per_image"][1]["warning"] == report["warnings"][0].removeprefix("image 1: ")
    assert "warning" not in report["per_image"][0] and "warning" not in report["overall"]
    assert "warning" not in report["mean_per_image"]
    printed = table(report)
    assert "\n        1! " in printed and "\n         0 " in printed
    assert printed.endswith(f"\n! {report['warnings'][0]}")


def test_images_of_different_sizes_are_scored_on_their_own_pixels():
    rng = np.random.default_rng(4)
    truth = [rng.integers(0, 2, (20, 30)).astype(bool), rng.integers(0, 2, (12, 16)).astype(bool)]
    perfect = [t.astype(np.float32) for t in truth]
    report = report_for(perfect, truth, 0.5)
    assert report["overall"] is None
    assert report["pixel_error"] == report["rand_error"] == report["warping_error"] == 0.0
    assert [row["foreground_iou"] for row in report["per_image"]] == [1.0, 1.0]


def test_seg_per_sequence_pools_the_objects_of_each_sequence(tmp_path):
    root = write_ctc(tmp_path)
    examples = [example for sequence in ("01", "02") for example in read_sequence(root, sequence)]
    instances = [example.instances for example in examples]
    sequences = ["01"] * len(CTC_ANNOTATED["01"]) + ["02"] * len(CTC_ANNOTATED["02"])
    probabilities = []
    for labels, sequence in zip(instances, sequences):
        # Touching cells 1 and 2 merge into one predicted cell (J = 0.5 each); in
        # sequence 02, cell 3 also loses a quarter of its columns (J = 0.75).
        probability = (labels > 0).astype(np.float32)
        if sequence == "02":
            probability[:, 65:][labels[:, 65:] == 3] = 0.0
        probabilities.append(probability)
    report = report_for(probabilities, [labels > 0 for labels in instances], 0.5, instances, sequences)

    def direct(*chosen: str) -> float:
        frames = [i for i, sequence in enumerate(sequences) if sequence in chosen]
        return seg(cell_instances(np.stack([probabilities[i] for i in frames])),
                           np.stack([instances[i] for i in frames]))

    assert report["seg_per_sequence"] == {"01": direct("01"), "02": direct("02")}
    assert report["seg_per_sequence"]["01"] == pytest.approx(2 / 3)
    assert report["seg_per_sequence"]["02"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    # Overall: every object of every frame counts once, not the mean of the two sequences.
    assert report["seg"] == direct("01", "02") == report["overall"]["seg"]
    assert report["seg"] != pytest.approx(np.mean(list(report["seg_per_sequence"].values())))


def test_panel_shows_input_truth_prediction_and_errors():
    truth = np.ones((8, 9), bool)
    truth[:, 4] = False  # two cells
    probability = truth.astype(np.float32)
    probability[1, 1] = 0.0  # a false membrane inside the left cell
    probability[4, 4] = 1.0  # a missed membrane pixel that joins the cells: a merger
    image = np.arange(72, dtype=np.uint8).reshape(8, 9)
    picture = panel(probability, truth, 0.5, image)
    tiles = [picture[:, i * 13:i * 13 + 9] for i in range(4)]  # each tile 9 wide, then a 4-pixel gap
    assert picture.shape == (8, 4 * 9 + 3 * 4, 3) and (picture[:, 9:13] == 128).all()
    grey_input, grey_truth, grey_prediction, errors = tiles
    assert grey_input.min() == 0 and grey_input.max() == 255  # the image's own range, not 0..255
    np.testing.assert_array_equal(grey_truth[..., 0], np.where(truth, 255, 0))
    assert grey_prediction[1, 1, 0] == 0 and grey_prediction[4, 4, 0] == 255
    assert tuple(errors[1, 1]) == COLOURS["false_membrane"] and tuple(errors[4, 4]) == COLOURS["merger"]
    assert np.count_nonzero((errors != 255).any(axis=-1)) == 2
