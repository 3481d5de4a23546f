"""Training on one machine or several: the strategy, and the loop for several machines.

- One machine (`train.strategy = mirrored`): `model.fit` under `MirroredStrategy` over all
  visible GPUs, or the CPU. The global batch is split across replicas and Keras scales
  the loss so that the gradients do not depend on the number of replicas.
- Several machines (`multi_worker`, cluster from `TF_CONFIG`): Keras 3's `model.fit` fails
  under `MultiWorkerMirroredStrategy` (keras-team/keras#20585: it reduces per-replica
  scalars along an axis they do not have), so `fit_distributed` runs the same model,
  loss, optimizer, metrics (Keras' own `train_step`/`test_step`) and callbacks in a loop
  of its own, calling the callbacks and ending as `model.fit` does (the validation's
  `on_test_begin`/`on_test_end`, the optimizer's `finalize_variable_values`). The chief
  writes checkpoints and logs.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.config.schema import TrainConfig
from pipeline.files import rundir


def strategy(train: TrainConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over this machine's devices, or MultiWorkerMirroredStrategy."""
    if train.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()


def task_id_of(distribution: tf.distribute.Strategy) -> int | None:
    """None for the chief, else this worker's index, which names its own train/worker-N/."""
    return None if rundir.is_chief() else distribution.cluster_resolver.task_id


def fit_distributed(
    model: keras.Model,
    distribution: tf.distribute.Strategy,
    train_data: tf.data.Dataset,
    val_data: tf.data.Dataset,
    train: TrainConfig,
    callback_list: list[keras.callbacks.Callback],
    initial_epoch: int,
) -> keras.callbacks.History:
    """`model.fit` for strategies it cannot handle: Keras' own steps in a loop of our own."""
    history = keras.callbacks.History()
    hooks = keras.callbacks.CallbackList(
        callback_list + [history], model=model, epochs=train.epochs, steps=train.steps_per_epoch, verbose=0
    )

    def run(step, batch):
        logs = distribution.run(step, args=(batch,))
        return {name: distribution.reduce("MEAN", value, axis=None) for name, value in logs.items()}

    train_step = tf.function(lambda batch: run(model.train_step, batch))
    test_step = tf.function(lambda batch: run(model.test_step, batch))
    # Workers share out the training tiles, but every worker sees every validation batch:
    # collective ops hang if one worker runs out of batches before another.
    batches = iter(distribution.experimental_distribute_dataset(_sharded(train_data, "DATA")))
    val_data = _sharded(val_data, "OFF")
    with distribution.scope():
        model.optimizer.build(model.trainable_variables)  # so that a backup restores its state too
    logs: dict[str, float] = {}
    hooks.on_train_begin()
    for epoch in range(initial_epoch, train.epochs):
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for step in range(train.steps_per_epoch):
            hooks.on_train_batch_begin(step)
            logs = {name: float(value) for name, value in train_step(next(batches)).items()}
            hooks.on_train_batch_end(step, logs)
        model.reset_metrics()
        hooks.on_test_begin()
        for batch in distribution.experimental_distribute_dataset(val_data):
            val_logs = test_step(batch)
        val_logs = {name: float(value) for name, value in val_logs.items()}
        hooks.on_test_end(val_logs)
        logs.update({f"val_{name}": value for name, value in val_logs.items()})
        hooks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    # As model.fit ends: an optimizer that averages the weights (train.ema_momentum) leaves the average.
    model.optimizer.finalize_variable_values(model.trainable_weights)
    hooks.on_train_end(logs)
    return history


def _sharded(data: tf.data.Dataset, policy: str) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, policy)
    return data.with_options(options)
