"""The elastic-warp op: exactness, statistics, alignment, seeds, OpenCV agreement, graph modes.

The properties of the sampling are checked on both implementations: the graph (XLA, GPU)
and the compiled CPU kernel (skipped, with the reason, where it cannot be built).
"""

import functools

import cv2
import numpy as np
import pytest
import tensorflow as tf

from pipeline.training import custom_op
from pipeline.training import elastic_warp as ew

SEED = tf.constant([3, 7])
NEEDS_KERNEL = pytest.mark.skipif(custom_op.load() is None, reason="the compiled warp kernel could not be built here")


@pytest.fixture(params=["graph", pytest.param("kernel", marks=NEEDS_KERNEL)])
def implementation(request):
    return request.param


@pytest.fixture
def warp(implementation):
    """`ew.warp` by one implementation."""
    return functools.partial(ew.warp, implementation=implementation)


def _example(height=40, width=48, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random((height, width, channels)).astype(np.float32)
    label = rng.integers(0, 3, (height, width)).astype(np.int32)
    weight = rng.random((height, width)).astype(np.float32)
    return image, label, weight


def _remap(image: np.ndarray, field: np.ndarray, interpolation: int) -> np.ndarray:
    rows, cols = np.mgrid[: field.shape[0], : field.shape[1]].astype(np.float32)
    return cv2.remap(image, cols + field[..., 1], rows + field[..., 0], interpolation,
                     borderMode=cv2.BORDER_REFLECT_101)


def _smooth_image(height, width, seed=0):
    noise = np.random.default_rng(seed).random((height, width)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 3) * 10


@pytest.mark.parametrize("interpolation", ew.INTERPOLATIONS)
def test_zero_displacement_is_the_identity_exactly(interpolation, warp, implementation):
    image, label, weight = _example()
    zero = tf.zeros(label.shape + (2,))
    np.testing.assert_array_equal(warp(image, zero, interpolation), image)
    warped = ew.warp_example(image, label, weight, zero, interpolation if interpolation != "nearest" else "bilinear",
                             implementation)
    for result, original in zip(warped, (image, label, weight)):
        np.testing.assert_array_equal(result, original)
    no_sigma = ew.elastic_warp(image, label, weight, SEED, sigma=0.0, implementation=implementation)
    for result, original in zip(no_sigma, (image, label, weight)):
        np.testing.assert_array_equal(result, original)


@pytest.mark.parametrize("interpolation", ew.INTERPOLATIONS)
def test_constant_displacement_shifts_by_exactly_that_amount(interpolation, warp):
    image, _, _ = _example()
    dy, dx = 3, -5
    shifted = warp(image, tf.broadcast_to([float(dy), float(dx)], (40, 48, 2)), interpolation).numpy()
    np.testing.assert_array_equal(shifted[:-dy, -dx:], image[dy:, : dx])


def test_fractional_shift_of_a_ramp_is_exact_for_bicubic_and_bilinear(warp):
    # Both kernels reproduce linear functions: ramp(y, x) = y + 2x sampled at (y + 2.5, x - 0.75).
    ramp = np.add.outer(np.arange(40.0), 2 * np.arange(48.0)).astype(np.float32)[..., None]
    for interpolation in ("bicubic", "bilinear"):
        shifted = warp(ramp, tf.broadcast_to([2.5, -0.75], (40, 48, 2)), interpolation).numpy()
        np.testing.assert_allclose(shifted[4:-4, 4:-4], ramp[4:-4, 4:-4] + 2.5 - 2 * 0.75, atol=1e-4)


def test_field_statistics_match_grid_and_sigma():
    # Nodes span the tile corner to corner: for 41 px and a 5x5 grid they sit every 10 px,
    # where the field equals the N(0, sigma^2) node draws; between them it is smoother.
    sigma, grid, size = 4.0, 5, 41
    seeds = tf.random.experimental.stateless_split(SEED, num=400)
    fields = tf.stack([ew.displacement_field((size, size), s, grid, sigma) for s in seeds]).numpy()
    nodes = fields[:, ::10, ::10]
    assert abs(nodes.mean()) < 0.1 * sigma
    assert abs(nodes.std() / sigma - 1) < 0.05
    flat = nodes.reshape(len(fields), -1)
    correlation = np.corrcoef(flat, rowvar=False)
    assert np.abs(correlation[~np.eye(len(correlation), dtype=bool)]).max() < 0.25  # independent nodes
    between = fields[:, 5::10, 5::10]
    assert between.std() < 0.9 * sigma
    # The field is exactly W G W^T for the grid's cubic weights: rank <= grid per component.
    assert np.linalg.matrix_rank(fields[0, ..., 0], tol=1e-3) == grid
    batch = ew.displacement_field((3, size, size), SEED, grid, sigma)
    assert batch.shape == (3, size, size, 2)


def test_labels_stay_in_the_label_set_and_aligned_with_the_image():
    # Blocky labels; the image's intensity equals its label, so after warping the image
    # rounded must equal the label except where the bicubic kernel mixes labels (edges).
    blocks = np.random.default_rng(1).integers(0, 3, (12, 12))
    label = np.kron(blocks, np.ones((8, 8), int)).astype(np.int32)
    image = label[..., None].astype(np.float32)
    warped_image, warped_label, _ = ew.elastic_warp(image, label, label.astype(np.float32), SEED, sigma=8.0)
    warped_label = warped_label.numpy()
    assert set(np.unique(warped_label)) <= {0, 1, 2}
    agree = np.round(warped_image.numpy()[..., 0]) == warped_label
    assert agree.mean() > 0.97
    # Misaligned by one pixel, the agreement would drop well below that.
    assert (np.round(warped_image.numpy()[1:, :, 0]) == warped_label[:-1]).mean() < agree.mean() - 0.05


def test_same_seed_same_result_different_seeds_different_fields():
    image, label, weight = _example()
    first = ew.elastic_warp(image, label, weight, SEED)
    again = ew.elastic_warp(image, label, weight, SEED)
    other = ew.elastic_warp(image, label, weight, tf.constant([3, 8]))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    field = ew.displacement_field((40, 48), SEED).numpy()
    assert not np.allclose(field, ew.displacement_field((40, 48), tf.constant([3, 8])).numpy(), atol=1.0)


def test_agrees_with_opencv_remap_with_opencvs_cubic_kernel(monkeypatch):
    # OpenCV's INTER_CUBIC uses a = -0.75: with that kernel the sampling, taps and
    # BORDER_REFLECT_101 mirroring must agree with OpenCV everywhere, even on noise.
    monkeypatch.setattr(ew, "_KEYS_A", -0.75)
    image, _, _ = _example(64, 80)
    field = ew.displacement_field((64, 80), SEED, sigma=10.0).numpy()
    reference = _remap(image[..., 0], field, cv2.INTER_CUBIC)
    np.testing.assert_allclose(ew.warp(image, field, "bicubic").numpy()[..., 0], reference, atol=1e-5)


def test_agrees_with_opencv_remap_bicubic_and_nearest(warp):
    image = _smooth_image(64, 80)
    field = ew.displacement_field((64, 80), SEED, sigma=10.0).numpy()
    cubic = warp(image[..., None], field, "bicubic").numpy()[..., 0]
    interior = (slice(8, -8), slice(8, -8))
    # Keys a = -0.5 against OpenCV's a = -0.75: close on a smooth image (values 0..10).
    np.testing.assert_allclose(cubic[interior], _remap(image, field, cv2.INTER_CUBIC)[interior], atol=0.05)
    label = np.random.default_rng(2).integers(0, 5, (64, 80)).astype(np.float32)
    nearest = warp(label[..., None], field, "nearest").numpy()[..., 0]
    # Ties (exactly half-way positions) may round differently; random fields hit none.
    assert (nearest[interior] == _remap(label, field, cv2.INTER_NEAREST)[interior]).mean() > 0.999
    linear = warp(image[..., None], field, "bilinear").numpy()[..., 0]
    np.testing.assert_allclose(linear[interior], _remap(image, field, cv2.INTER_LINEAR)[interior], atol=0.02)


def test_works_under_xla():
    image, label, weight = _example()
    compiled = tf.function(ew.elastic_warp, jit_compile=True)
    first, again = compiled(image, label, weight, SEED), compiled(image, label, weight, SEED)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], compiled(image, label, weight, tf.constant([3, 8]))[0])
    # XLA draws its own random stream, but samples a given field as the eager op does.
    field = ew.displacement_field((40, 48), SEED)
    compiled_warp = tf.function(ew.warp_example, jit_compile=True)
    for a, b in zip(compiled_warp(image, label, weight, field), ew.warp_example(image, label, weight, field)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_works_inside_dataset_map_with_parallel_calls():
    image, label, weight = _example()

    def warp_one(index):
        return ew.elastic_warp(image, label, weight, tf.stack([tf.constant(3, tf.int64), index]))

    dataset = tf.data.Dataset.range(4).map(warp_one, num_parallel_calls=tf.data.AUTOTUNE)
    results = list(dataset)
    assert len(results) == 4 and results[0][0].shape == image.shape
    expected = ew.elastic_warp(image, label, weight, tf.constant([3, 2], tf.int64))
    np.testing.assert_array_equal(results[2][1], expected[1])


def test_batch_equals_tiles_one_by_one(warp):
    images = np.stack([_example(seed=s)[0] for s in range(3)])
    fields = ew.displacement_field((3, 40, 48), SEED)
    batch = warp(images, fields).numpy()
    for image, field, warped in zip(images, fields, batch):
        np.testing.assert_allclose(warped, warp(image, field).numpy(), atol=1e-6)
    shared = warp(images, fields[0]).numpy()  # one field for the whole batch
    np.testing.assert_allclose(shared[1], warp(images[1], fields[0]).numpy(), atol=1e-6)


def test_uint8_and_float_input_keep_their_dtype_and_multichannel_works(warp):
    image = np.round(_smooth_image(40, 48)[..., None] * 25).clip(0, 255)
    image = np.concatenate([image, 255 - image], axis=-1)
    field = ew.displacement_field((40, 48), SEED)
    as_float = warp(image.astype(np.float32), field).numpy()
    as_uint8 = warp(image.astype(np.uint8), field)
    assert as_uint8.dtype == tf.uint8 and as_uint8.shape == (40, 48, 2)
    expected = np.clip(np.round(warp(image.astype(np.uint8).astype(np.float32), field).numpy()), 0, 255)
    np.testing.assert_array_equal(as_uint8.numpy(), expected)
    assert np.abs(as_uint8.numpy().astype(float) - as_float).max() <= 1.0


def test_rotation_by_90_degrees_equals_rot90(warp):
    image, _, _ = _example(40, 40, channels=2)
    rotated = warp(image, ew.rotation_field((40, 40), np.pi / 2)).numpy()
    np.testing.assert_allclose(rotated, np.rot90(image), atol=1e-4)
    label = np.random.default_rng(3).integers(0, 4, (40, 40, 1)).astype(np.int32)
    np.testing.assert_array_equal(warp(label, ew.rotation_field((40, 40), -np.pi / 2), "nearest"),
                                  np.rot90(label, -1))


def test_rotation_corners_are_mirrored_not_constant(warp):
    image = _smooth_image(40, 40)[..., None] + 5
    rotated = warp(image, ew.rotation_field((40, 40), np.pi / 4)).numpy()
    assert rotated[:3, :3].min() > 1  # a constant border would be 0 here


def test_unknown_interpolation_raises():
    with pytest.raises(ValueError, match="interpolation"):
        ew.warp(np.zeros((4, 4, 1), np.float32), tf.zeros((4, 4, 2)), "lanczos")


@pytest.mark.parametrize("interpolation", ew.INTERPOLATIONS)
def test_mirrors_exactly_far_beyond_the_border(interpolation, warp):
    # Mirroring is periodic (period 2 * (size - 1)): whole shifts reproduce numpy's
    # repeated reflection two image sizes out, and a fractional shift equals the same
    # shift plus whole periods.
    image, _, _ = _example(10, 12)
    dy, dx = 23, -17
    shifted = warp(image, tf.broadcast_to([float(dy), float(dx)], (10, 12, 2)), interpolation).numpy()
    padded = np.pad(image, ((30, 30), (30, 30), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(shifted, padded[30 + dy:40 + dy, 30 + dx:42 + dx])
    near = warp(image, tf.broadcast_to([0.3, -0.6], (10, 12, 2)), interpolation).numpy()
    far = warp(image, tf.broadcast_to([0.3 + 18, -0.6 - 22], (10, 12, 2)), interpolation).numpy()
    np.testing.assert_allclose(far, near, atol=1e-5)


@pytest.mark.parametrize("interpolation", ew.INTERPOLATIONS)
def test_xla_and_unknown_shapes_agree_with_eager_for_batches_channels_and_uint8(interpolation):
    images = np.stack([_example(16, 20, channels=3, seed=s)[0] for s in range(2)])
    fields = ew.displacement_field((2, 16, 20), SEED, sigma=6.0)
    compiled = tf.function(lambda i, f: ew.warp(i, f, interpolation), jit_compile=True)
    unknown = tf.function(lambda i, f: ew.warp(i, f, interpolation),
                          input_signature=[tf.TensorSpec([None] * 4, tf.float32), tf.TensorSpec([None] * 4)])
    expected = ew.warp(images, fields, interpolation).numpy()
    np.testing.assert_allclose(compiled(images, fields), expected, atol=1e-5)
    np.testing.assert_allclose(unknown(images, fields), expected, atol=1e-5)
    as_uint8 = (images * 255).astype(np.uint8)
    difference = compiled(as_uint8, fields).numpy().astype(int) - ew.warp(as_uint8, fields, interpolation).numpy()
    assert np.abs(difference).max() <= 1  # rounding of values within float error of .5


@pytest.mark.parametrize("interpolation", ew.INTERPOLATIONS)
def test_images_of_one_and_two_pixels(interpolation, warp):
    for height, width in ((1, 1), (1, 5), (2, 2)):
        image = np.arange(height * width, dtype=np.float32).reshape(height, width, 1)
        field = ew.displacement_field((height, width), SEED, sigma=3.0)
        warped = warp(image, field, interpolation).numpy()
        assert warped.shape == image.shape and np.isfinite(warped).all()
        if height == 1 and width == 1:
            np.testing.assert_allclose(warped, image, atol=1e-6)


def test_nan_displacements_sample_the_edge_instead_of_failing(warp):
    image, _, _ = _example()
    field = np.zeros((40, 48, 2), np.float32)
    field[5, 7] = np.nan
    for interpolation in ew.INTERPOLATIONS:
        warped = warp(image, field, interpolation).numpy()
        assert np.isfinite(warped).all()


@NEEDS_KERNEL
@pytest.mark.parametrize("interpolation", ew.INTERPOLATIONS)
def test_kernel_equals_the_graph_for_batches_channels_dtypes_and_wild_fields(interpolation):
    rng = np.random.default_rng(4)
    for batch, height, width, channels in ((1, 1, 1, 1), (2, 3, 17, 1), (1, 37, 29, 3), (3, 16, 24, 2)):
        values = rng.normal(size=(batch, height, width, channels)).astype(np.float32) * 40 + 100
        # Smooth and rough fields, some far beyond the border, and a NaN.
        field = rng.normal(size=(batch, height, width, 2)).astype(np.float32) * rng.choice([0.3, 4.0, 90.0])
        field.flat[rng.integers(field.size)] = np.nan
        for dtype in (np.float32, np.float64, np.uint8, np.int16, np.int32):
            image = values.astype(dtype) if dtype in (np.float32, np.float64) else values.clip(0, 255).astype(dtype)
            graph = ew.warp(image, field, interpolation, "graph").numpy()
            kernel = ew.warp(image, field, interpolation, "kernel").numpy()
            assert kernel.dtype == graph.dtype and kernel.shape == graph.shape
            if interpolation == "nearest":
                np.testing.assert_array_equal(kernel, graph)
            elif np.issubdtype(dtype, np.integer):
                # The same float sums in another order: a value within float error of .5 may round the other way.
                assert np.abs(kernel.astype(int) - graph.astype(int)).max() <= 1
            else:
                # 16 float32 products of values ~100 summed in another order: ~1e-5 relative.
                np.testing.assert_allclose(kernel, graph, rtol=1e-5, atol=2e-3)
        shared = ew.warp(values, field[0], interpolation, "kernel").numpy()  # one field for the batch
        np.testing.assert_allclose(shared, ew.warp(values, field[0], interpolation, "graph").numpy(), atol=2e-3)


@NEEDS_KERNEL
def test_kernel_runs_inside_dataset_map_and_tf_function():
    image, label, weight = _example()

    def augment(index):
        return ew.elastic_warp(image, label, weight, tf.stack([tf.constant(3, tf.int64), index]),
                               implementation="kernel")

    results = list(tf.data.Dataset.range(4).map(augment, num_parallel_calls=4))
    expected = ew.elastic_warp(image, label, weight, tf.constant([3, 2], tf.int64))
    np.testing.assert_allclose(results[2][0], expected[0], atol=1e-5)
    np.testing.assert_array_equal(results[2][1], expected[1])
    traced = tf.function(lambda: ew.elastic_warp(image, label, weight, SEED, implementation="kernel"))
    np.testing.assert_allclose(traced()[2], ew.elastic_warp(image, label, weight, SEED)[2], atol=1e-5)


@NEEDS_KERNEL
def test_kernel_rejects_mismatched_fields_and_unsupported_dtypes():
    with pytest.raises(tf.errors.InvalidArgumentError, match="field must be"):
        ew.warp(np.zeros((8, 8, 1), np.float32), tf.zeros((8, 9, 2)), implementation="kernel")
    with pytest.raises(ValueError, match="float16"):
        ew.warp(np.zeros((8, 8, 1), np.float16), tf.zeros((8, 8, 2)), implementation="kernel")
    # 'auto' takes the graph where the kernel has no such dtype.
    assert ew.warp(np.zeros((8, 8, 1), np.float16), tf.zeros((8, 8, 2)), implementation="auto").dtype == tf.float16
    with pytest.raises(ValueError, match="implementation"):
        ew.warp(np.zeros((8, 8, 1), np.float32), tf.zeros((8, 8, 2)), implementation="opencv")
