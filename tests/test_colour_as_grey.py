"""One rule for a colour image and a 1-channel model (`io.COLOUR_AS_GREY`), tested by
`io.grey_pixels`: whole files (`io.read_stack`), large images block by block
(`large_image.statistics`) and the serving signature's graph ops (`segmenter._as_batch`)
accept and refuse the same images, the numpy ones with io's one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tifffile

from pipeline.config.resolve import preset
from pipeline.errors import PipelineError
from pipeline.files import io, lazy_image
from pipeline.inference import large_image
from pipeline.inference.segmenter import _as_batch

HEIGHT, WIDTH = 70, 90


def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH), np.uint8)


def rgb() -> np.ndarray:
    return np.stack([grey()] * 3, -1)


def rgba(alpha: int | np.ndarray = 200) -> np.ndarray:
    return np.concatenate([rgb(), np.broadcast_to(np.uint8(alpha), (HEIGHT, WIDTH))[..., None]], -1)


def off_in_the_last_pixel(image: np.ndarray, channel: int) -> np.ndarray:
    image = image.copy()
    image[-1, -1, channel] ^= 1  # far from the first pixel, in the last chunk of a large image
    return image


IMAGES = {
    "grey rgb": (rgb(), True),
    "grey rgba, constant alpha": (rgba(), True),
    "green off in one pixel": (off_in_the_last_pixel(rgb(), 1), False),
    "blue off in one pixel": (off_in_the_last_pixel(rgba(), 2), False),
    "alpha off in one pixel": (off_in_the_last_pixel(rgba(), 3), False),
    "real colour": (np.stack([grey(), grey() // 2, grey()], -1), False),
}


def test_grey_pixels_tells_each_pixel_apart():
    pixels = np.array([[10, 10, 10, 7], [10, 11, 10, 7], [10, 10, 9, 7], [4, 4, 4, 8], [4, 4, 4, 7]], np.uint8)
    np.testing.assert_array_equal(io.grey_pixels(pixels, pixels[0]), [True, False, False, False, True])
    np.testing.assert_array_equal(io.grey_pixels(pixels[:, :3], pixels[0, :3]), [True, False, False, True, True])


def refusal(path: Path, have: int) -> str:
    return f"{path}: colour image ({have} channels) but the model takes 1 channel; " \
           f"convert it to grey or train with model.input_channels={have}"


@pytest.mark.parametrize("name", IMAGES)
def test_every_reader_applies_the_one_rule(tmp_path, name, capsys):
    image, is_grey = IMAGES[name]
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb",
                     **({"extrasamples": ["unassalpha"]} if image.shape[-1] == 4 else {}))
    config = preset("smoke")
    config = dataclasses.replace(config, predict=dataclasses.replace(config.predict, tile_size=60, chunk_size=40))
    if is_grey:
        np.testing.assert_array_equal(io.read_stack(path)[0, ..., 0], grey())
        assert large_image.statistics(path, config)[0] == pytest.approx(grey().mean(), rel=1e-12)
        np.testing.assert_array_equal(_as_batch(tf.constant(image), 1)[0].numpy()[0, ..., 0], grey())
        assert f"notice: {path}: colour image with identical R, G and B channels read as grey" in capsys.readouterr().err
        return
    for read in (io.read_stack, lambda p: large_image.statistics(p, config)):
        with pytest.raises(PipelineError) as caught:
            read(path)
        assert str(caught.value) == refusal(path, image.shape[-1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"a 1-channel model reads a colour image"):
        _as_batch(tf.constant(image), 1)


def test_a_channel_mismatch_of_a_large_image_is_io_s_line(tmp_path):
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey(), tile=(32, 32))
    with pytest.raises(PipelineError) as caught:
        lazy_image.open_lazy(path, 3)
    assert str(caught.value) == str(io.channel_mismatch(path, 1, 3)) \
        == f"{path}: grey image (1 channel) but the model takes 3 channels"
