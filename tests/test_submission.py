"""The challenges' submission formats, written and read back."""

import numpy as np
import pytest
import tifffile

from pipeline.errors import PipelineError
from pipeline.metrics.submission import write_ctc_results, write_isbi2012


def test_isbi2012_submission_is_a_float32_stack_in_order(tmp_path):
    probabilities = np.random.default_rng(0).random((3, 8, 9))
    path = write_isbi2012(tmp_path / "submission.tif", probabilities)
    back = tifffile.imread(path)
    assert back.dtype == np.float32 and back.shape == (3, 8, 9)
    np.testing.assert_array_equal(back, probabilities.astype(np.float32))
    with pytest.raises(PipelineError, match="outside"):
        write_isbi2012(tmp_path / "bad.tif", probabilities + 1)


def test_ctc_result_folder_holds_16_bit_masks(tmp_path):
    instances = np.zeros((2, 5, 5), np.int32)
    instances[1, 1:3, 1:3] = 300
    paths = write_ctc_results(tmp_path, instances, sequence=1)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["01_RES/mask000.tif", "01_RES/mask001.tif"]
    mask = tifffile.imread(paths[1])
    assert mask.dtype == np.uint16 and mask[1, 1] == 300
    with pytest.raises(PipelineError, match="already exists"):
        write_ctc_results(tmp_path, instances)
