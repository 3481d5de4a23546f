import math

import keras
import numpy as np
import pytest

from pipeline.config.schema import ModelConfig
from pipeline.errors import PipelineError
from pipeline.sizes import (
    alignment,
    check_input_size,
    context,
    input_size_problem,
    is_valid_input_size,
    output_size,
    smallest_input_size,
    valid_input_sizes,
)
from pipeline.training.model import unet


@pytest.fixture(scope="module")
def paper_model():
    keras.utils.set_random_seed(1)
    return unet(ModelConfig())


def test_paper_network_has_23_convolutions_and_31m_parameters(paper_model):
    convolutions = [l for l in paper_model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    assert len(convolutions) == 23
    assert paper_model.count_params() == 31_030_658
    assert [l.filters for l in convolutions if l.name.startswith("down")] == [64, 64, 128, 128, 256, 256, 512, 512]


def test_paper_network_maps_572_to_388(paper_model):
    assert output_size(572, 5) == 388
    assert context(5) == 92 and alignment(5) == 16
    assert paper_model(np.zeros((1, 572, 572, 1), np.float32)).shape == (1, 388, 388, 2)


def test_initialisation_is_gaussian_with_std_sqrt_2_over_n(paper_model):
    for name, fan_in in [("down3_conv1", 9 * 256), ("bottom_conv2", 9 * 1024), ("up1_upconv", 256), ("up0_conv1", 9 * 128)]:
        kernel = paper_model.get_layer(name).kernel.numpy().ravel()
        expected = math.sqrt(2 / fan_in)
        # Standard error of a sample std is std / sqrt(2n); allow 5 of them.
        assert abs(kernel.std() - expected) < 5 * expected / math.sqrt(2 * kernel.size)
        assert abs(kernel.mean()) < 5 * expected / math.sqrt(kernel.size)
        # Untruncated: a Gaussian has ~0.27% of draws beyond 3 std; a 2-std truncation has none.
        assert np.mean(np.abs(kernel) > 2.5 * expected) > 0.005


@pytest.mark.parametrize("depth,size", [(2, 18), (3, 44), (3, 92), (4, 188), (4, 252)])
def test_any_valid_size_gives_the_predicted_output_size(depth, size):
    model = unet(ModelConfig(depth=depth, base_filters=2, dropout=0.0))
    out = model(np.zeros((1, size, size, 1), np.float32)).shape
    assert out == (1, output_size(size, depth), output_size(size, depth), 2)
    assert output_size(size, depth) == size - 2 * context(depth)


def test_valid_sizes_step_by_the_pooling_alignment():
    sizes = valid_input_sizes(5, 1, 700)
    assert 572 in sizes and 188 in sizes
    assert set(np.diff(sizes)) == {16}
    assert not is_valid_input_size(571, 5)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
def test_valid_sizes_are_exactly_those_that_pass_every_pooling(depth, padding):
    # The progression from the smallest size against the layer-by-layer test of each size.
    passing = [s for s in range(-5, 1200) if is_valid_input_size(s, depth, padding)]
    assert valid_input_sizes(depth, -5, 1199, padding) == passing
    assert smallest_input_size(depth, padding) == passing[0]
    assert valid_input_sizes(depth, passing[2] + 1, passing[4], padding) == passing[3:5]


def test_size_arithmetic_answers_at_once_for_a_deep_network():
    # Sizes grow as 2^depth: searching for valid sizes one by one would never end. From
    # depth 3 on, the smallest tile gives a 4 px output from a bottom side of 8 px.
    assert smallest_input_size(40) == (8 + 4) * 2**39 - 4
    assert output_size(smallest_input_size(40), 40) == 4
    assert context(40) == 3 * 2**40 - 4 and context(5) == 3 * 2**5 - 4 == 92
    assert "smallest valid size is 6597069766652" in input_size_problem(572, 40)


def test_invalid_size_names_the_nearest_valid_sizes():
    with pytest.raises(PipelineError, match=r"input size 570: not a valid .* nearest valid sizes: 556 and 572"):
        check_input_size(570, 5)
    with pytest.raises(PipelineError, match=r"smallest valid size is 188"):
        check_input_size(20, 5)
    with pytest.raises(PipelineError, match="input size 570"):
        output_size(570, 5)


def test_configurable_channels_classes_and_dropout():
    model = unet(ModelConfig(depth=2, base_filters=4, num_classes=3, input_channels=2, dropout=0.3))
    assert model.input_shape == (None, None, None, 2)
    assert model.output_shape[-1] == 3
    assert [l.rate for l in model.layers if isinstance(l, keras.layers.Dropout)] == [0.3, 0.3]
    probabilities = model(np.random.default_rng(0).normal(size=(1, 20, 20, 2)).astype(np.float32))
    np.testing.assert_allclose(probabilities.numpy().sum(-1), 1.0, rtol=1e-5)


def test_same_padding_keeps_the_size_and_needs_no_context():
    # The common Keras U-Net, built only for the ablation against the paper's valid one.
    model = unet(ModelConfig(depth=3, base_filters=2, dropout=0.0, padding="same"))
    assert model(np.zeros((1, 48, 48, 1), np.float32)).shape == (1, 48, 48, 2)
    assert context(3, "same") == 0 and output_size(48, 3, "same") == 48
    assert valid_input_sizes(3, 1, 20, "same") == [4, 8, 12, 16, 20]
    assert model.count_params() == unet(ModelConfig(depth=3, base_filters=2, dropout=0.0)).count_params()
