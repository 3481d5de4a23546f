"""Inference: a trained model on images of any size, and the files of its predictions.

- `segmenter`: whole-image segmentation (`segmentation_function`, `Segmenter`), and the
  functions the export traces into the SavedModel.
- `tiling`: overlap-tile prediction with mirror extrapolation.
- `labelling`: cell instances of a probability map (`labelling.instances` on whole
  images, `labelling.graph` inside a TensorFlow graph, `labelling.chunked` over the
  chunks of a large image).
- `outputs`: the files predict writes for one input.
- `large_image`, `chunk_grid`: images larger than memory, chunk by chunk.
- `beam`: batch prediction on Apache Beam.

The stages `predict`, `evaluate` and `export` share it, so that no stage imports another.
"""
