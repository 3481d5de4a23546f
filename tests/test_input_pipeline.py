"""Training tiles: shapes, image/label alignment under augmentation, seeded reproducibility, colour."""

import numpy as np
import pytest

from pipeline.config.schema import AugmentConfig, TrainConfig
from pipeline.normalization import normalize
from pipeline.sizes import output_size
from pipeline.training import input_pipeline

DEPTH, TILE = 3, 92
OUT = output_size(TILE, DEPTH)
NO_GRAY = dict(brightness=0.0, contrast=0.0, gamma=0.0)


def _data(count=3, size=100, seed=0):
    """Blocky binary labels; images are 255 * label, so a normalised pixel is > 0 iff its label is 1."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, 2, (count, size // 5, size // 5)), np.ones((1, 5, 5), int))
    images = (255 * labels[..., None]).astype(np.uint8)
    weights = 1 + labels.astype(np.float32)  # weight 1 on membrane, 2 on cell
    return images, labels, weights


def _colour(images: np.ndarray) -> np.ndarray:
    """RGB of grey `_data` images: red where they are bright, green where dark, no blue."""
    return np.concatenate([images, 255 - images, np.zeros_like(images)], axis=-1)


def _batches(augment: AugmentConfig, seed=0, count=3, batch_size=4, first_batch=0, colour=False):
    images, labels, weights = _data()
    images = _colour(images) if colour else images
    train = TrainConfig(seed=seed, tile_size=TILE, batch_size=batch_size)
    dataset = input_pipeline.training_dataset(images, labels, weights, DEPTH, train, augment, first_batch)
    return [tuple(part.numpy() for part in batch) for batch in dataset.take(count)]


def test_tiles_have_the_element_format():
    tiles, labels, weights = _batches(AugmentConfig())[0]
    assert tiles.shape == (4, TILE, TILE, 1) and tiles.dtype == np.float32
    assert labels.shape == (4, OUT, OUT) and labels.dtype == np.int32
    assert weights.shape == (4, OUT, OUT) and weights.dtype == np.float32
    assert set(np.unique(labels)) <= {0, 1}


def _agreement(tiles, labels, shift=(0, 0)):
    """Fraction of output-window pixels where the image's sign says the label's class."""
    margin = (TILE - OUT) // 2
    dy, dx = shift
    centre = tiles[:, margin + dy : margin + dy + OUT, margin + dx : margin + dx + OUT, 0]
    return ((centre > 0) == (labels == 1)).mean()


@pytest.mark.parametrize("augment", [AugmentConfig(), AugmentConfig(**NO_GRAY), AugmentConfig(elastic=False, rotate=False)],
                         ids=["all", "geometric", "exact"])
def test_label_tile_is_aligned_with_the_image_tile(augment):
    tiles, labels, weights = (np.concatenate(parts) for parts in zip(*_batches(augment, count=4)))
    aligned = _agreement(tiles, labels)
    # Nearest-sampled labels and bicubic images differ only at interpolated block edges.
    assert aligned > (0.999 if not augment.elastic else 0.97)
    for shift in [(1, 0), (0, 1), (-1, 0), (0, -1)]:
        assert _agreement(tiles, labels, shift) < aligned - 0.05
    # The weights (bilinear) follow the labels (nearest) too.
    assert (np.abs(weights - (1 + labels)) < 0.5).mean() > 0.97


def test_same_seed_same_batches_other_seed_other_batches():
    first, again, other = _batches(AugmentConfig(), 0), _batches(AugmentConfig(), 0), _batches(AugmentConfig(), 1)
    for batch, repeat in zip(first, again):
        for part, repeated in zip(batch, repeat):
            np.testing.assert_array_equal(part, repeated)
    assert not np.array_equal(first[0][0], other[0][0])



def test_first_batch_resumes_the_stream_where_it_left_off():
    stream, resumed = _batches(AugmentConfig(), count=3), _batches(AugmentConfig(), count=1, first_batch=2)
    for part, repeated in zip(stream[2], resumed[0]):
        np.testing.assert_array_equal(part, repeated)


def test_colour_tiles_move_all_channels_with_the_labels():
    geometric = AugmentConfig(**NO_GRAY)  # flips, turns, rotation and elastic deformation
    tiles, labels, weights = (np.concatenate(parts) for parts in zip(*_batches(geometric, count=2, colour=True)))
    assert tiles.shape == (8, TILE, TILE, 3) and tiles.dtype == np.float32
    margin = (TILE - OUT) // 2
    red, green, blue = np.moveaxis(tiles[:, margin : margin + OUT, margin : margin + OUT], -1, 0)
    assert ((red > green) == (labels == 1)).mean() > 0.97
    # Normalised over all channels at once (mean 85, standard deviation 85 * sqrt(2) for
    # every image), the empty blue channel is -1/sqrt(2) like every zero of red and green;
    # normalised per channel, a constant channel would be 0.
    np.testing.assert_allclose(blue, -1 / np.sqrt(2), atol=1e-4)


def test_normalisation_is_one_per_image_over_all_channels():
    images, _, _ = _data(count=2)
    colour = _colour(images).astype(np.float32)
    normalised = normalize(colour).numpy()
    for image, original in zip(normalised, colour):
        assert abs(image.mean()) < 1e-5 and abs(image.std() - 1) < 1e-3
        np.testing.assert_allclose(image, (original - original.mean()) / original.std(), atol=1e-5)
