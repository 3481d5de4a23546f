"""Data set loading and its one-line errors for bad input."""

import dataclasses

import numpy as np
import pytest
import tifffile

from fakes import (CTC_ANNOTATED, CTC_NAME, ctc_frame, imwrite, touching_cells, write_colour_folder, write_ctc,
                   write_image_folder, write_rgb)
from pipeline import data
from pipeline.config.schema import DataConfig, Range
from pipeline.data.image_files import PERCENTILES, to_uint8
from pipeline.errors import PipelineError


def isbi_folder(tmp_path, slices=5, labels=None, size=32, test_slices=0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    imwrite(tmp_path / "train-volume.tif", rng.integers(0, 255, (slices, size, size), dtype=np.uint8))
    if labels is None:
        labels = np.where(rng.uniform(size=(slices, size, size)) > 0.3, 255, 0).astype(np.uint8)
    imwrite(tmp_path / "train-labels.tif", labels)
    imwrite(tmp_path / "test-volume.tif", rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    return DataConfig(dataset="isbi2012", data_dir=str(tmp_path), val_slices=2, test_slices=test_slices)


def test_isbi2012_holds_out_the_last_slices(tmp_path):
    splits = data.load(isbi_folder(tmp_path))
    assert [len(splits[s].images) for s in data.SPLITS] == [3, 2, 3]
    assert splits["test"].instances is None
    volume = tifffile.imread(tmp_path / "train-volume.tif")
    np.testing.assert_array_equal(splits["val"].images[..., 0], volume[3:])
    labels = tifffile.imread(tmp_path / "train-labels.tif")
    np.testing.assert_array_equal(splits["train"].labels, labels[:3] == 255)


def test_isbi2012_stacks_saved_by_fiji_read_as_the_same_slices(tmp_path):
    """ImageJ's hyperstack declares a stack's sections as channels (CYX): they are slices all the same."""
    config = isbi_folder(tmp_path / "plain")
    (tmp_path / "imagej").mkdir()
    for name in ("train-volume.tif", "train-labels.tif", "test-volume.tif"):
        tifffile.imwrite(tmp_path / "imagej" / name, tifffile.imread(tmp_path / "plain" / name), imagej=True)
    with tifffile.TiffFile(tmp_path / "imagej" / "train-volume.tif") as saved:
        assert saved.series[0].axes == "CYX"
    plain, imagej = data.load(config), data.load(dataclasses.replace(config, data_dir=str(tmp_path / "imagej")))
    for split in data.SPLITS:
        np.testing.assert_array_equal(imagej[split].images, plain[split].images)
        if plain[split].instances is not None:
            np.testing.assert_array_equal(imagej[split].instances, plain[split].instances)


def test_isbi2012_test_slices_are_the_first_ones_apart_from_validation(tmp_path):
    splits = data.load(isbi_folder(tmp_path, slices=6, test_slices=1))
    assert [len(splits[s].images) for s in data.SPLITS] == [3, 2, 1]
    volume, labels = tifffile.imread(tmp_path / "train-volume.tif"), tifffile.imread(tmp_path / "train-labels.tif")
    np.testing.assert_array_equal(splits["test"].images[..., 0], volume[:1])
    np.testing.assert_array_equal(splits["test"].labels, labels[:1] == 255)
    np.testing.assert_array_equal(splits["train"].images[..., 0], volume[1:4])
    np.testing.assert_array_equal(splits["val"].images[..., 0], volume[4:])
    assert data.DATASETS["isbi2012"].held_out_test(isbi_folder(tmp_path, slices=6, test_slices=1))
    assert not data.DATASETS["isbi2012"].held_out_test(isbi_folder(tmp_path, slices=6, test_slices=0))


def test_isbi2012_held_out_parts_must_leave_training_slices(tmp_path):
    with pytest.raises(PipelineError, match=r"^data.val_slices=2 and data.test_slices=3 must leave training "
                                            r"slices among 5$"):
        data.load(isbi_folder(tmp_path, test_slices=3))


def test_missing_and_empty_data_folders(tmp_path):
    with pytest.raises(PipelineError, match=r"^the isbi2012 data set needs --data-dir \(the folder with train-volume"):
        data.load(DataConfig(dataset="isbi2012"))
    with pytest.raises(PipelineError, match=f"^{tmp_path / 'nope'}: data folder does not exist$"):
        data.load(DataConfig(dataset="isbi2012", data_dir=str(tmp_path / "nope")))
    with pytest.raises(PipelineError, match="data folder is empty"):
        data.load(DataConfig(dataset="isbi2012", data_dir=str(tmp_path)))
    (tmp_path / "train-volume.tif").write_bytes(b"")
    with pytest.raises(PipelineError, match="train-labels.tif: missing ISBI 2012 file"):
        data.load(DataConfig(dataset="isbi2012", data_dir=str(tmp_path)))


def test_labels_that_do_not_match_the_images(tmp_path):
    labels = np.full((4, 32, 32), 255, np.uint8)
    with pytest.raises(PipelineError, match=r"train-labels.tif: 4 labels of \(32, 32\) px do not match"):
        data.load(isbi_folder(tmp_path, labels=labels))
    with pytest.raises(PipelineError, match="train-labels.tif: 5 labels of .32, 30. px"):
        data.load(isbi_folder(tmp_path, labels=np.full((5, 32, 30), 255, np.uint8)))


def test_labels_that_are_not_binary(tmp_path):
    labels = np.full((5, 32, 32), 255, np.uint8)
    labels[0, 0, :3] = [0, 17, 128]
    with pytest.raises(PipelineError, match=r"train-labels.tif: labels must be binary .* found 0, 17, 128, 255"):
        data.load(isbi_folder(tmp_path, labels=labels))


def test_corrupt_tiff_and_wrong_dtype(tmp_path):
    config = isbi_folder(tmp_path)
    (tmp_path / "test-volume.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(PipelineError, match="test-volume.tif: corrupt or unreadable TIFF"):
        data.load(config)
    imwrite(tmp_path / "test-volume.tif", np.zeros((2, 32, 32), np.float32))
    with pytest.raises(PipelineError, match="test-volume.tif: expected 8-bit grey images, got float32"):
        data.load(config)


def test_isbi2012_reference_is_the_papers_row_beside_the_scored_split():
    row = data.DATASETS["isbi2012"].reference.row("val")
    assert (row["warping_error"], row["rand_error"], row["pixel_error"]) == (0.000353, 0.0382, 0.0611)
    assert row["note"].endswith("ours are on the val slices, a different test set")


def test_synthetic_splits_are_distinct_and_reproducible():
    config = DataConfig(image_size=64, num_train=2, num_val=1, num_test=1)
    first, second = data.load(config), data.load(config)
    np.testing.assert_array_equal(first["train"].images, second["train"].images)
    assert not np.array_equal(first["train"].images[0], first["test"].images[0])
    assert first["val"].images.shape == (1, 64, 64, 1)


# --- Cell Tracking Challenge and image folders ------------------------------------------------


def ctc_config(folder) -> DataConfig:
    return DataConfig(dataset=f"ctc2d/{CTC_NAME}", data_dir=str(folder))


def test_ctc2d_uses_only_annotated_frames_and_holds_out_sequence_02(tmp_path):
    write_ctc(tmp_path)
    splits = data.load(ctc_config(tmp_path))
    assert splits["train"].ids == [f"01_t{t:03d}" for t in CTC_ANNOTATED["01"]]
    assert splits["val"].ids == splits["test"].ids == [f"02_t{t:03d}" for t in CTC_ANNOTATED["02"]]
    sequence_of = data.DATASETS[f"ctc2d/{CTC_NAME}"].sequence_of  # evaluate's SEG per sequence
    assert [{sequence_of(i) for i in splits[s].ids} for s in ("train", "val")] == [{"01"}, {"02"}]
    first = splits["train"]
    assert first.images.dtype == np.uint8 and first.instances.dtype == np.int32
    np.testing.assert_array_equal(first.instances[1], touching_cells((64, 80), 12))  # 01, frame 2
    np.testing.assert_array_equal(first.images[0, ..., 0], to_uint8(ctc_frame((64, 80), 10)))


def test_ctc2d_reads_the_zip_as_downloaded(tmp_path):
    write_ctc(tmp_path, as_zip=True)
    from_zip = data.load(ctc_config(tmp_path))
    write_ctc(tmp_path / "unzipped")
    from_folder = data.load(ctc_config(tmp_path / "unzipped"))
    for name in data.SPLITS:
        np.testing.assert_array_equal(from_zip[name].images, from_folder[name].images)
        np.testing.assert_array_equal(from_zip[name].instances, from_folder[name].instances)


def test_sixteen_bit_images_are_scaled_by_percentiles():
    frame = ctc_frame((64, 80), 0)  # ~3000 +- 100 with one hot pixel at 65535
    scaled = to_uint8(frame)
    low, high = np.percentile(frame, PERCENTILES)
    assert scaled.dtype == np.uint8 and scaled[0, 0] == 255
    assert scaled[frame <= low].max() == 0 and scaled[frame >= high].min() == 255
    assert 100 < scaled.mean() < 155  # the hot pixel does not squash the contrast
    assert to_uint8(np.full((4, 4), 7, np.uint16)).max() == 0
    eight_bit = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert to_uint8(eight_bit) is eight_bit


def test_ctc2d_ground_truth_without_image(tmp_path):
    root = write_ctc(tmp_path)
    (root / "02" / "t003.tif").unlink()
    truth = root / "02_GT" / "SEG" / "man_seg003.tif"
    with pytest.raises(PipelineError, match=f"^{truth}: ground-truth frame with no matching image .*t003.tif$"):
        data.load(ctc_config(tmp_path))


def test_ctc2d_bad_ground_truth(tmp_path):
    root = write_ctc(tmp_path)
    truth = root / "01_GT" / "SEG" / "man_seg002.tif"
    imwrite(truth, np.zeros((64, 81), np.uint16))
    with pytest.raises(PipelineError, match=f"^{truth}: labels of 64x81 px do not match the image's 64x80 px$"):
        data.load(ctc_config(tmp_path))
    imwrite(truth, np.full((64, 80), -3, np.int16))
    with pytest.raises(PipelineError, match="man_seg002.tif: unexpected label values: negative label -3"):
        data.load(ctc_config(tmp_path))
    imwrite(truth, np.full((64, 80), 0.5, np.float32))
    with pytest.raises(PipelineError, match="man_seg002.tif: unexpected label values: labels must be integers"):
        data.load(ctc_config(tmp_path))
    truth.write_bytes(b"II*\x00garbage")
    with pytest.raises(PipelineError, match="man_seg002.tif: corrupt or unreadable TIFF"):
        data.load(ctc_config(tmp_path))


def test_ctc2d_missing_files(tmp_path):
    with pytest.raises(PipelineError, match=f"{tmp_path}: neither {CTC_NAME}.zip nor {CTC_NAME}/01/"):
        data.load(ctc_config(tmp_path))
    root = write_ctc(tmp_path)
    for path in (root / "02_GT" / "SEG").iterdir():
        path.unlink()
    with pytest.raises(PipelineError, match=r"02_GT/SEG: no man_segNNN.tif ground-truth frames"):
        data.load(ctc_config(tmp_path))
    with pytest.raises(PipelineError, match=f"^unknown data set 'ctc2d/Fluo-X'; choose one of .*ctc2d/{CTC_NAME}"):
        data.load(DataConfig(dataset="ctc2d/Fluo-X", data_dir=str(tmp_path)))


def test_image_folder_pairs_binary_and_instance_masks_of_any_size(tmp_path):
    write_image_folder(tmp_path)
    splits = data.load(DataConfig(dataset="image_folder", data_dir=str(tmp_path), val_images=2))
    assert splits["train"].ids == ["a"] and splits["val"].ids == splits["test"].ids == ["b", "c"]
    binary = splits["train"].instances[0]
    assert set(np.unique(binary)) == {0, 1, 2}  # two components of a 0/255 mask
    val = splits["val"]
    # c (64x70, 16-bit) is padded to b's 72x72: images by mirroring, labels with background.
    assert val.images.shape == (2, 72, 72, 1) and val.images.dtype == np.uint8
    np.testing.assert_array_equal(val.sizes, [[72, 72], [64, 70]])
    np.testing.assert_array_equal(val.instances[1, :64, :70], touching_cells((64, 70), 1))
    assert not val.instances[1, 64:].any() and not val.instances[1, :, 70:].any()
    np.testing.assert_array_equal(val.images[1, 64:66, :70], val.images[1, 62:60:-1, :70])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "images" / "b.tif").unlink(), r"masks/b.tif: mask with no image b\.\*"),
        (lambda root: (root / "masks" / "a.png").unlink(), r"images/a.png: image with no mask a\.\*"),
        (lambda root: imwrite(root / "masks" / "b.tif", np.zeros((72, 71), np.uint8)),
         r"masks/b.tif: labels of 72x71 px do not match the image's 72x72 px"),
        (lambda root: imwrite(root / "masks" / "b.tif", np.full((72, 72), 1.5, np.float32)),
         r"masks/b.tif: unexpected label values: labels must be integers, got float32"),
        (lambda root: (root / "images" / "c.tif").write_bytes(b"not a tiff"), r"images/c.tif: corrupt or unreadable TIFF"),
        (lambda root: (root / "masks" / "a.png").write_bytes(b"not a png"), r"masks/a.png: corrupt or unreadable PNG"),
        (lambda root: imwrite(root / "images" / "a.tif", np.zeros((72, 72), np.uint8)),
         r"images/a.tif: two files named a \(a.png, a.tif\)"),
    ],
)
def test_image_folder_bad_input_names_the_file(tmp_path, damage, message):
    damage(write_image_folder(tmp_path))
    with pytest.raises(PipelineError, match=message):
        data.load(DataConfig(dataset="image_folder", data_dir=str(tmp_path)))


def test_image_folder_empty_or_missing(tmp_path):
    config = DataConfig(dataset="image_folder", data_dir=str(tmp_path))
    with pytest.raises(PipelineError, match=r"images: missing folder \(expected images/ and masks/ side by side\)"):
        data.load(config)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(PipelineError, match=r"images: folder is empty"):
        data.load(config)
    with pytest.raises(PipelineError, match="needs --data-dir"):
        data.load(DataConfig(dataset="image_folder"))
    write_image_folder(tmp_path / "one")
    with pytest.raises(PipelineError, match="data.val_images=3 must leave training images among the 3"):
        data.load(DataConfig(dataset="image_folder", data_dir=str(tmp_path / "one"), val_images=3))


def test_image_folder_reads_colour_images_for_a_three_channel_model(tmp_path):
    written = write_colour_folder(tmp_path)
    splits = data.load(DataConfig(dataset="image_folder", data_dir=str(tmp_path)), channels=3)
    train, val = splits["train"], splits["val"]
    assert train.images.shape == (2, 72, 72, 3) and train.images.dtype == np.uint8
    # In R, G, B order from the PNG (OpenCV's BGR undone) and from the TIFF.
    np.testing.assert_array_equal(train.images[0], written["a.png"])
    np.testing.assert_array_equal(train.images[1], written["b.tif"])
    # The 16-bit image is scaled with one pair of percentiles over all its channels, so
    # its channels keep their balance: the constant, dim blue stays dim (scaled channel
    # by channel, its noise would fill half the range).
    np.testing.assert_array_equal(val.images[0], to_uint8(written["c.tif"]))
    cells = touching_cells((64, 70), 2) > 0
    red, green, blue = (val.images[0, ..., channel] for channel in range(3))
    assert red[cells].mean() > 200 and green[cells].mean() < 100 and blue.mean() < 40


def test_image_folder_refuses_colour_for_a_one_channel_model_and_grey_for_three(tmp_path):
    write_colour_folder(tmp_path / "colour")
    refusal = r"colour image \(3 channels\) but the model takes 1 channel; convert it to grey or train with"
    with pytest.raises(PipelineError, match=rf"^\S*/colour/images/a.png: {refusal} model.input_channels=3$"):
        data.load(DataConfig(dataset="image_folder", data_dir=str(tmp_path / "colour")))
    write_image_folder(tmp_path / "grey")
    with pytest.raises(PipelineError, match=r"^\S*/grey/images/a.png: grey image \(1 channel\) but the model takes 3"):
        data.load(DataConfig(dataset="image_folder", data_dir=str(tmp_path / "grey")), channels=3)


def test_image_folder_reads_grey_stored_as_colour_as_grey_with_a_notice(tmp_path, capsys):
    write_image_folder(tmp_path)
    config = DataConfig(dataset="image_folder", data_dir=str(tmp_path))
    grey = data.load(config)["train"].images
    write_rgb(tmp_path / "images" / "a.png", np.repeat(grey[0], 3, axis=-1))
    np.testing.assert_array_equal(data.load(config)["train"].images, grey)
    assert "images/a.png: colour image with identical R, G and B channels read as grey" in capsys.readouterr().err


def test_grey_data_sets_refuse_a_model_of_other_channels():
    refusal = r"^the synthetic data set has grey images: it needs model.input_channels=1, not 3"
    with pytest.raises(PipelineError, match=refusal + r" \(data sets of colour images: image_folder\)$"):
        data.load(DataConfig(), channels=3)


# --- the registry ----------------------------------------------------------------------------


def test_only_time_lapse_data_sets_group_into_sequences_and_only_isbi_has_a_reference():
    assert [name for name, d in data.DATASETS.items() if d.sequence_of] == [f"ctc2d/{n}" for n in data.ctc2d.SETS]
    assert [name for name, d in data.DATASETS.items() if d.reference] == ["isbi2012"]


@pytest.mark.parametrize("fields, message", [
    ({"labels": "cells"}, "labels='cells' must be one of binary, instances, either"),
    ({"settings": {"held_out": Range(1)}}, r"settings \['held_out'\] are not DataConfig fields"),
    ({"image_size_setting": "image_size"}, "image_size_setting must be one of its settings"),
    ({"needs_data_dir": True}, "needs_data_dir needs data_dir to say what the folder holds"),
    ({"recipes": {"gpu": {}}}, r"recipes for unknown presets \['gpu'\]"),
])
def test_a_description_the_pipeline_cannot_follow_is_refused(fields, message):
    with pytest.raises(PipelineError, match=rf"^data set 'mine': {message}$"):
        data.Dataset(**{"name": "mine", "read": data.DATASETS["synthetic"].read, "labels": "instances", **fields})


def test_a_name_is_registered_once():
    with pytest.raises(PipelineError, match="^data set 'synthetic' is registered already$"):
        data.register(data.DATASETS["synthetic"])
