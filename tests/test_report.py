"""The evaluation report: scores per image and overall, warnings, SEG per sequence, object matching, table and panel."""

import cv2
import numpy as np
import pytest

from fakes import CTC_ANNOTATED, write_ctc
from pipeline.data.ctc2d import read_sequence
from pipeline.inference.labelling.instances import cell_instances
from pipeline.metrics.ctc import seg
from pipeline.metrics.matching import match, pool, record
from pipeline.metrics.report import COLOURS, panel, report_for, summary, table
from test_instances import discs_with_bridge

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
    # Without reference instances there are no objects to match.
    assert "instance_matching" not in report and "AP@0.5" not in table(report)


def _two_cells_instances() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_two_cells` with the truth's instances: the left cell (7 columns) is 1, the right (8) is 2.

    The prediction's membrane splits cell 1 into rows 0-7 (IoU 56/112 = 0.5) and 9-15
    (IoU 49/112); cell 2 is right (IoU 1). At IoU 0.5: TP 2, FP 1, FN 0, so AP = 2/3 and
    F1 = 4/5; at 0.55 and above: TP 1, FP 2, FN 1, AP = 1/4 and F1 = 2/5.
    """
    probability, truth = _two_cells()
    return probability, truth, np.where(truth, np.where(np.arange(16) < 7, 1, 2), 0)


def test_instance_matching_per_image_overall_and_in_the_table():
    probability, truth, instances = _two_cells_instances()
    report = report_for([probability, truth.astype(np.float32)], [truth, truth], 0.5, [instances, instances])
    first, second = (row["instance_matching"] for row in report["per_image"])
    assert first == record(match(cell_instances(probability), instances))
    assert (first["tp"], first["fp"], first["fn"]) == (2, 1, 0)
    assert (first["accuracy"], first["f1"]) == pytest.approx((2 / 3, 4 / 5))
    assert first["accuracy_per_iou_threshold"]["0.55"] == first["accuracy_per_iou_threshold"]["0.95"] == 1 / 4
    assert first["mean_accuracy_over_iou_thresholds"] == pytest.approx((2 / 3 + 9 / 4) / 10)
    assert second["accuracy"] == second["mean_accuracy_over_iou_thresholds"] == 1.0
    # Overall sums the counts: TP 4, FP 1, FN 0 at 0.5; TP 3, FP 2, FN 1 above.
    overall = report["overall"]["instance_matching"]
    assert (overall["accuracy"], overall["accuracy_per_iou_threshold"]["0.6"]) == pytest.approx((4 / 5, 1 / 2))
    assert report["instance_matching"] == overall and summary(report)["instance_matching"] == overall
    assert "instance_matching" not in report["mean_per_image"]  # pooled, not a mean of ratios

    lines = table(report).splitlines()
    assert lines[1].endswith("     AP@0.5     F1@0.5   AP.5:.95")
    assert lines[2].startswith("         0 ") and lines[2].endswith(
        "".join(f"{value:>11.4f}" for value in (2 / 3, 4 / 5, (2 / 3 + 9 / 4) / 10)))
    assert lines[4].startswith("      mean ") and lines[4].endswith("          -" * 3)
    assert lines[5].startswith("   overall ") and lines[5].endswith(
        "".join(f"{overall[key]:>11.4f}" for key in ("accuracy", "f1", "mean_accuracy_over_iou_thresholds")))
    assert any(line.startswith("AP@0.5, F1@0.5: StarDist's accuracy TP/(TP+FP+FN)") for line in lines)


def test_warping_pixels_are_the_warping_error_by_kind():
    truth = np.ones((5, 7), bool)
    truth[:, 6] = False
    probability = truth.astype(float)
    probability[:, 2] = 0  # a membrane across the cell: one split pixel at every threshold
    report = report_for([probability, truth.astype(float)], [truth, truth], 0.5)
    assert [row["warping_pixels"] for row in report["per_image"]] == [{"splits": 1, "mergers": 0},
                                                                      {"splits": 0, "mergers": 0}]
    assert report["overall"]["warping_pixels"] == {"splits": 1, "mergers": 0}
    assert report["warping_error"] == 1 / 70
    assert "warping_pixels" not in report["mean_per_image"]  # counts of images' own thresholds
    lines = table(report).splitlines()
    assert lines[1].startswith("     image    warping     splits    mergers       Rand")
    assert lines[2].startswith(f"         0   {1 / 35:.6f}          1          0 ")
    assert lines[4].startswith(f"      mean   {1 / 70:.6f}          -          - ")
    assert lines[5].startswith(f"   overall   {1 / 70:.6f}          1          0 ")


def test_the_segmentation_metrics_score_the_cells_as_the_method_separates_them():
    # Two cells 4 px apart, and a prediction that misses the membrane where a 3 px bridge crosses it.
    probability, first, second = discs_with_bridge((15, 15))
    truth = np.zeros(probability.shape, np.uint8)
    for (y, x) in (first, second):
        cv2.circle(truth, (x, y), 15, 1, -1)
    components = report_for([probability], [truth.astype(bool)], 0.5)
    assert components == report_for([probability], [truth.astype(bool)], 0.5, method="components")
    assert components["segmentation"] == "components"
    assert components["rand_error"] > 0.3 and components["overall"]["warping_pixels"]["mergers"] > 0
    # The watershed cuts the bridge inside the true membrane: the merger is gone, and nothing else changes.
    watershed = report_for([probability], [truth.astype(bool)], 0.5, method="watershed")
    assert watershed["segmentation"] == "watershed"
    assert watershed["rand_error"] == watershed["warping_error"] == 0.0
    assert watershed["overall"]["v_rand_error"] == watershed["overall"]["v_info_error"] == 0.0
    assert watershed["overall"]["warping_pixels"] == {"splits": 0, "mergers": 0}
    assert watershed["pixel_error"] == components["pixel_error"]  # the map's pixels, whatever the method
    assert "predict.instances=watershed separates them" in table(watershed)
    assert "predict.instances" not in table(components)
    # The panel shows the cut as predicted membrane and no merger pixels.
    errors = panel(probability, truth.astype(bool), 0.5, method="watershed")[:, -probability.shape[1]:]
    assert not (errors == COLOURS["merger"]).all(axis=-1).any()
    assert (panel(probability, truth.astype(bool), 0.5)[:, -probability.shape[1]:] == COLOURS["merger"]).all(
        axis=-1).any()


def test_instance_matching_pools_images_of_different_sizes():
    probability, truth, instances = _two_cells_instances()
    crop = np.s_[:, :12]  # cell 2 keeps 4 of its columns, still predicted right
    report = report_for([probability, truth[crop].astype(np.float32)], [truth, truth[crop]], 0.5,
                        [instances, instances[crop]])
    assert report["overall"] is None
    assert report["instance_matching"] == record(pool([match(cell_instances(probability), instances),
                                                       match(instances[crop], instances[crop])]))
    assert report["instance_matching"]["accuracy"] == 4 / 5
    overall_row = [line for line in table(report).splitlines() if line.startswith("   overall ")]
    matched = [report["instance_matching"][key] for key in ("accuracy", "f1", "mean_accuracy_over_iou_thresholds")]
    assert overall_row == ["   overall" + "          -" * 10 + "".join(f"{value:>11.4f}" for value in matched)]


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
    picture = panel(probability, truth, 0.5, image[..., None])
    tiles = [picture[:, i * 13:i * 13 + 9] for i in range(4)]  # each tile 9 wide, then a 4-pixel gap
    assert picture.shape == (8, 4 * 9 + 3 * 4, 3) and (picture[:, 9:13] == 128).all()
    grey_input, grey_truth, grey_prediction, errors = tiles
    assert grey_input.min() == 0 and grey_input.max() == 255  # the image's own range, not 0..255
    np.testing.assert_array_equal(grey_truth[..., 0], np.where(truth, 255, 0))
    assert grey_prediction[1, 1, 0] == 0 and grey_prediction[4, 4, 0] == 255
    assert tuple(errors[1, 1]) == COLOURS["false_membrane"] and tuple(errors[4, 4]) == COLOURS["merger"]
    assert np.count_nonzero((errors != 255).any(axis=-1)) == 2
