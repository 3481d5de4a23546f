"""Training the U-Net: the network, its loss, the tiles it learns from, how it learns.

- `model`: the U-Net as a functional Keras model, and compiled for training.
- `loss`: the weighted pixel-wise cross-entropy.
- `input_pipeline`, `augmentation`, `elastic_warp` (with `custom_op` and its kernel
  `warp_kernel.cc`): the tf.data stream of random, transformed training tiles.
- `schedule`: the learning-rate schedule and the optimizer.
- `finetune`: starting from the weights of another model.
- `distribution`: the strategy, and the loop for several machines.
- `callbacks`: what happens at the end of every epoch.
- `process`: the settings of the training process (op determinism, precision notices).
- `allocator`: glibc's malloc keeping freed memory.

The stage that runs it all is `pipeline.stages.train`.
"""
