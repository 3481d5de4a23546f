"""Stage `train`: the U-Net with the weighted loss, on one machine or several, resumable.

- One machine (`train.strategy = mirrored`): `model.fit` under `MirroredStrategy` over all
  visible GPUs, or the CPU. The global batch is split across replicas and Keras scales
  the loss so that the gradients do not depend on the number of replicas.
- Several machines (`multi_worker`, cluster from `TF_CONFIG`): Keras 3's `model.fit` fails
  under `MultiWorkerMirroredStrategy` (keras-team/keras#20585: it reduces per-replica
  scalars along an axis they do not have), so `fit_distributed` runs the same model,
  loss, optimizer, metrics (Keras' own `train_step`/`test_step`) and callbacks in a loop
  of its own. The chief writes checkpoints and logs.
- Survives being killed: `BackupAndRestore` keeps the weights and optimizer state of the
  last finished epoch; the same command resumes there, with the tile stream at the same
  position, and ends after the same number of steps as an uninterrupted run.
- Fine-tuning (`train.init_from`): the freshly built U-Net gets the weights of another
  run's best model, a .keras file or a bioimage.io package this project exported, layer by
  layer, once their shapes are checked against this run's `model` section. A resumed
  fine-tuning takes its weights from the backup, not from `init_from` again.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_framework_config  # disable_op_determinism: no public name

from pipeline.config.schema import Config, TrainConfig
from pipeline.errors import PipelineError
from pipeline.files import bioimageio, io, model_file, rundir
from pipeline.files.rundir import RunDir
from pipeline.metrics.training import training_metrics
from pipeline.training import allocator, input_pipeline
from pipeline.training.callbacks import (
    BestModelCheckpoint, ChallengeScores, HistoryLog, StopOnDivergence, ValidationImages,
)
from pipeline.training.loss import weighted_cross_entropy
from pipeline.training.model import unet, unet_in_precision


@keras.saving.register_keras_serializable(package="unet_pipeline")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up from 0 to `peak` over `warmup_steps`, then `peak` held or decayed
    to 0 at `total_steps` (`config.LR_SCHEDULES`).

    Keras' CosineDecay has a warm-up but PolynomialDecay has none, and nnU-Net's "poly"
    schedule is the polynomial one: one schedule here gives each shape the same warm-up.
    """

    def __init__(self, peak: float, total_steps: int, shape: str = "constant", warmup_steps: int = 0):
        self.peak, self.total_steps, self.shape, self.warmup_steps = peak, total_steps, shape, warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warming = self.peak * (step + 1) / max(self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0, 1)
        if self.shape == "cosine":
            decayed = self.peak * 0.5 * (1 + keras.ops.cos(np.pi * progress))
        elif self.shape == "polynomial":
            decayed = self.peak * (1 - progress) ** 0.9
        else:
            decayed = self.peak * keras.ops.ones_like(progress)
        return keras.ops.where(step < self.warmup_steps, warming, decayed)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "shape": self.shape,
                "warmup_steps": self.warmup_steps}


def optimizer(train: TrainConfig) -> keras.optimizers.Optimizer:
    """SGD with the paper's high momentum, or Adam for fast convergence on a CPU, on `LearningRate`,
    clipping the gradients' global norm at `train.clipnorm` where it is set.

    Call it inside the strategy's scope. Keras clips each replica's gradients before they
    are summed, and each replica's are its share of the global batch's (the loss is divided
    by the number of replicas), so the norm is divided the same way: replicas whose
    gradients agree are clipped as one device would clip their sum.
    """
    rate = train.learning_rate
    if train.lr_schedule != "constant" or train.warmup_steps:
        rate = LearningRate(rate, train.epochs * train.steps_per_epoch, train.lr_schedule, train.warmup_steps)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    clipping = {"global_clipnorm": train.clipnorm / replicas} if train.clipnorm else {}
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=train.momentum, **clipping)
    return keras.optimizers.Adam(rate, **clipping)


def strategy(train: TrainConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over this machine's devices, or MultiWorkerMirroredStrategy."""
    if train.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()


# The instructions that run a mixed precision's 16-bit convolutions natively on a CPU, as
# Linux names them in /proc/cpuinfo. Without them oneDNN emulates the type on AVX-512 CPUs
# and TensorFlow falls back to Eigen on others, neither expected to beat float32.
NATIVE_16_BIT = {"mixed_bfloat16": ("avx512_bf16", "amx_bf16"), "mixed_float16": ("avx512_fp16", "amx_fp16")}


def emulated_on_cpu(precision: str, cpu_flags: set[str]) -> bool:
    """Whether a CPU with `cpu_flags` lacks every instruction set that runs `precision` natively."""
    return precision in NATIVE_16_BIT and not cpu_flags & set(NATIVE_16_BIT[precision])


def cpu_precision_problem(precision: str, cpu_flags: set[str]) -> str | None:
    """What training in `precision` on a CPU with `cpu_flags` should be warned of, or None."""
    if emulated_on_cpu(precision, cpu_flags):
        return (f"this CPU has none of {', '.join(NATIVE_16_BIT[precision])}, so the 16-bit convolutions are emulated "
                "and training may be slower than in float32")
    if precision == "mixed_bfloat16" and "amx_bf16" in cpu_flags:
        # results.md, "A collapse in mixed precision on an Intel Xeon": the cause is not
        # known, the failure was on an Intel Xeon with AMX and never on AMD CPUs.
        return ("on an Intel Xeon with AMX (amx_bf16), as this CPU, every ISBI run of 10,000 steps in this precision "
                "diverged after 4,000 to 7,750 (docs/results.md); training stops if it does, and float32 is safe")
    return None


def precision_notice(train: TrainConfig) -> None:
    """Says what `cpu_precision_problem` finds for a mixed precision on this CPU (Linux, no GPU)."""
    if train.precision not in NATIVE_16_BIT or tf.config.list_physical_devices("GPU"):
        return
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: nothing to tell by
        return
    problem = cpu_precision_problem(train.precision, flags)
    if problem:
        print(f"notice: train.precision={train.precision}: {problem}", flush=True)


def set_determinism(train: TrainConfig) -> None:
    """TensorFlow's deterministic ops, unless XLA compiles the training step.

    Keras will not compile with XLA under op determinism: it would train without XLA and
    only warn. So `train.jit_compile` turns determinism off, in this process, and says so.
    """
    if train.jit_compile:
        tf_framework_config.disable_op_determinism()  # a process may train more than once
        print("notice: train.jit_compile=true trains without TensorFlow's op determinism (XLA needs that)",
              flush=True)
    else:
        tf.config.experimental.enable_op_determinism()


def compiled_model(config: Config) -> keras.Model:
    """The U-Net compiled with the weighted loss; call inside a strategy scope.

    Mixed precision computes in float16/bfloat16 but keeps the variables, the softmax and
    the loss in float32 (and, for float16, scales the loss against underflow).
    """
    model = unet_in_precision(config.model, config.train.precision)
    model.compile(
        optimizer=optimizer(config.train),
        loss=weighted_cross_entropy(),
        metrics=training_metrics(config.model.num_classes),
        jit_compile=config.train.jit_compile,
    )
    if config.train.jit_compile and not model.jit_compile:  # Keras falls back without XLA, with a warning
        raise PipelineError("train.jit_compile=true: Keras cannot compile this model with XLA here (is TensorFlow's "
                            "op determinism on?)")
    return model


# The `model` settings that fix a U-Net's weights, in the order a mismatch is reported:
# another depth changes the layers themselves, so it is named before the channel counts.
ARCHITECTURE = ("depth", "input_channels", "base_filters", "num_classes", "padding")


def initial_weights_file(init_from: str) -> Path:
    """The file `train.init_from` names: a run directory's train/best.keras, a .keras file or a package zip."""
    path = Path(init_from)
    if path.is_dir():
        return rundir.require(RunDir(path).best_model, "train")
    if path.suffix not in (".keras", ".zip"):
        raise PipelineError(f"{path}: train.init_from takes a run directory, a .keras file or a bioimage.io "
                            "package (.zip)")
    if not path.is_file():
        raise PipelineError(f"{path}: no such file (train.init_from)")
    return path


def load_initial_model(source: Path) -> keras.Model:
    """The model in `source` (from `initial_weights_file`), without its training configuration."""
    if source.suffix == ".zip":
        return _load_package(source)
    return _load_keras(source, source)


def _load_keras(path: Path, named: Path) -> keras.Model:
    """Reads a .keras file; `named` is the file the user gave, for the message."""
    # Keras answers "File not found" for a file that is there but not a zip archive.
    if not zipfile.is_zipfile(path):
        raise PipelineError(f"{named}: not a .keras model file (not a zip archive)")
    try:
        return keras.saving.load_model(path, compile=False)
    except (KeyError, OSError, ValueError) as error:
        raise PipelineError(f"{named}: cannot be read as a Keras model ({str(error).splitlines()[0]})") from None


def _load_package(path: Path) -> keras.Model:
    """The Keras model of a bioimage.io package, from the keras_v3 weights it names."""
    with tempfile.TemporaryDirectory() as folder:
        # Keras reads a path; the model is in memory once loaded, so the copy can go.
        extracted = Path(folder) / "model.keras"
        extracted.write_bytes(bioimageio.keras_weights(path))
        return _load_keras(extracted, path)


def architecture(model: keras.Model, named: Path) -> dict[str, int | str]:
    """The ARCHITECTURE settings of a U-Net that `pipeline.training.model.unet` built, read from its layers."""
    try:
        first, classifier = model.get_layer("down0_conv1"), model.get_layer("classifier")
    except ValueError:
        raise PipelineError(f"{named}: not a U-Net of this pipeline (no layers down0_conv1 and classifier)") from None
    _, _, channels, filters = first.kernel.shape
    return {
        "depth": 1 + sum(layer.name.endswith("_upconv") for layer in model.layers),  # one per level above the bottom
        "input_channels": channels,
        "base_filters": filters,
        "num_classes": classifier.kernel.shape[-1],
        # Same shapes, but the weights learnt features of zero-padded or of unpadded
        # convolutions: the skip connections' crops differ too.
        "padding": first.padding,
    }


def _weight_shapes(model: keras.Model) -> dict[str, list[tuple[int, ...]]]:
    """Each layer's weight shapes, by layer name (layers without weights left out)."""
    return {layer.name: [tuple(weight.shape) for weight in layer.weights] for layer in model.layers if layer.weights}


def copy_weights(source: keras.Model, model: keras.Model, named: Path) -> None:
    """Gives `model` the weights of `source`, layer by layer, or refuses with the first mismatch.

    The mismatch is named in the configuration's terms where it is one of ARCHITECTURE
    (`runs/a/train/best.keras: trained with model.base_filters=16, this run has 8`), else
    by layer. Nothing is copied unless every layer fits.
    """
    trained, wanted = architecture(source, named), architecture(model, named)
    for field in ARCHITECTURE:
        if trained[field] != wanted[field]:
            raise PipelineError(f"{named}: trained with model.{field}={trained[field]!r}, "
                                f"this run has {wanted[field]!r}")
    shapes, expected = _weight_shapes(source), _weight_shapes(model)
    for name in sorted(shapes.keys() | expected.keys()):
        if shapes.get(name) != expected.get(name):
            raise PipelineError(f"{named}: layer {name} has weights of shapes {shapes.get(name)}, "
                                f"this run's U-Net {expected.get(name)}")
    for name in expected:
        model.get_layer(name).set_weights(source.get_layer(name).get_weights())


def check_initial_weights(config: Config) -> None:
    """Refuses, with one line, weights that `train.init_from` names but this run's U-Net
    cannot take: for `--stage all`, before `prepare` writes anything."""
    source = initial_weights_file(config.train.init_from)
    copy_weights(load_initial_model(source), unet(config.model), source)


def joined(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The images, instances and weight maps of two prepared splits as one, for training.

    Splits of different image sizes are padded to the larger as `prepare` pads within a
    split: images by mirroring, instances and weights with 0, so the padding is never learnt.
    """
    height = max(first["images"].shape[1], second["images"].shape[1])
    width = max(first["images"].shape[2], second["images"].shape[2])

    def padded(array: np.ndarray, mode: str) -> np.ndarray:
        pads = [(0, 0), (0, height - array.shape[1]), (0, width - array.shape[2])] + [(0, 0)] * (array.ndim - 3)
        return np.pad(array, pads, mode=mode)

    modes = {"images": "reflect", "instances": "constant", "weights": "constant"}
    return {key: np.concatenate([padded(first[key], mode), padded(second[key], mode)]) for key, mode in modes.items()}


def _task_id(distribution: tf.distribute.Strategy) -> int | None:
    """None for the chief, else this worker's index, which names its own train/worker-N/."""
    return None if rundir.is_chief() else distribution.cluster_resolver.task_id


def resumed_epoch(backup_dir: Path) -> int:
    """Epochs finished by an interrupted run, from BackupAndRestore's own record (0 if none)."""
    record = Path(backup_dir) / "training_metadata.json"
    if not record.exists():
        return 0
    try:
        return int(json.loads(record.read_text())["epoch"])
    except (ValueError, KeyError, TypeError):  # written by Keras in place: a full disk can cut it short
        raise PipelineError(f"{record}: the backup of the interrupted training is damaged; start the training "
                            "again with --overwrite") from None


def callbacks(
    config: Config, run: RunDir, task_id: int | None, val_tile: tuple[np.ndarray, ...], val_split: dict
) -> list[keras.callbacks.Callback]:
    """Backup and divergence guard on every worker; checkpoints and logs on the chief only.

    The challenge scores, when they choose the model, come first: the callbacks after
    them read them from the same epoch's logs (every worker, as early stopping needs them).
    The backup comes last: an epoch counts as finished only once everything else of it is
    written, so a run that fails in any of them (a disk filling up) resumes at that epoch.
    """
    backup = run.backup(task_id)
    chosen = [StopOnDivergence()]
    if config.train.select_by in ("val_rand_error", "val_warping_error"):
        chosen.insert(0, ChallengeScores(val_split["images"], val_split["instances"] > 0, val_split.get("sizes"),
                                         config))
    if task_id is None:
        chosen += [
            BestModelCheckpoint(run.best_model, run.best_record, config, recorded_score(config.train),
                                last=keeps_last_epoch(config.train)),
            HistoryLog(run.history, resumed_epoch(backup)),
            keras.callbacks.TensorBoard(log_dir=str(run.logs)),
            ValidationImages(run.logs, *val_tile),
        ]
    if config.train.early_stopping_patience:
        chosen.append(keras.callbacks.EarlyStopping(
            config.train.select_by, patience=config.train.early_stopping_patience, restore_best_weights=True))
    return chosen + [keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True)]


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
        for batch in distribution.experimental_distribute_dataset(val_data):
            val_logs = test_step(batch)
        logs.update({f"val_{name}": float(value) for name, value in val_logs.items()})
        hooks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    hooks.on_train_end(logs)
    return history


def _sharded(data: tf.data.Dataset, policy: str) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, policy)
    return data.with_options(options)


def run(config: Config, run: RunDir, overwrite: bool = False) -> keras.callbacks.History:
    """Trains on the prepared data; writes train/best.keras, train/last.keras and logs/.

    An interrupted run resumes from its last finished epoch. A finished run's model is
    not replaced unless `overwrite`, which also discards an interrupted run's backup.
    """
    train_split = rundir.load_split(run, "train", config)
    val_split = rundir.load_split(run, "val", config)
    if config.train.include_validation:
        train_split = joined(train_split, val_split)
    depth, train = config.model.depth, config.train
    distribution = strategy(train)
    task_id = _task_id(distribution)
    initial_epoch = 0 if overwrite else resumed_epoch(run.backup(task_id))
    if not initial_epoch:
        io.refuse_existing([run.best_model], overwrite)
    # A resumed run restores its weights from the backup, so it neither needs nor reads
    # init_from. Loaded before the seed is set: loading draws initial values (which the
    # saved ones replace), and the run's random stream must not depend on that.
    source = initial_weights_file(train.init_from) if train.init_from and not initial_epoch else None
    initial = load_initial_model(source) if source else None

    keras.utils.set_random_seed(train.seed)
    set_determinism(train)
    precision_notice(train)
    if train.keep_freed_memory and not allocator.keep_freed_memory():
        print("notice: train.keep_freed_memory needs glibc's malloc, which this system does not have; "
              "training frees memory as usual", flush=True)
    train_data = input_pipeline.training_dataset(
        train_split["images"], train_split["instances"] > 0, train_split["weights"], depth, train, config.augment,
        first_batch=initial_epoch * train.steps_per_epoch, padding=config.model.padding,
    )
    val_tiles = input_pipeline.validation_tiles(
        val_split["images"], val_split["instances"] > 0, val_split["weights"], depth, train, config.model.padding
    )
    val_data = input_pipeline.validation_dataset(val_tiles, train.batch_size)
    with distribution.scope():
        model = compiled_model(config)
        if initial is not None:
            copy_weights(initial, model, source)
            del initial  # copied: its memory is the training's now
    prepared_channels = train_split["images"].shape[-1]  # prepare reads images with the model's channels
    if prepared_channels != config.model.input_channels:
        raise PipelineError(f"{run.prepared('train')}: images of {prepared_channels} channel(s) were prepared, but "
                            f"model.input_channels={config.model.input_channels}; run --stage prepare again")
    # Every check has passed: from here on the run directory changes.
    run.save_config(config)
    if not initial_epoch:
        run.discard_training(task_id)
    run.worker(task_id).mkdir(parents=True, exist_ok=True)
    callback_list = callbacks(config, run, task_id, tuple(part[0] for part in val_tiles), val_split)

    resuming = f", resuming after epoch {initial_epoch}" if initial_epoch else ""
    starting = f" from the weights of {source or train.init_from}" if train.init_from else ""
    print(
        f"training a depth-{depth} U-Net ({model.count_params():,} parameters){starting} on "
        f"{distribution.num_replicas_in_sync} replica(s) ({train.strategy}, {train.precision}): "
        f"{train.epochs} epochs x {train.steps_per_epoch} steps of {train.batch_size} tiles of "
        f"{train.tile_size} px{resuming}",
        flush=True,
    )
    if train.strategy == "multi_worker":
        history = fit_distributed(model, distribution, train_data, val_data, train, callback_list, initial_epoch)
    else:
        history = model.fit(
            train_data,
            epochs=train.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=train.steps_per_epoch,
            validation_data=val_data,
            callbacks=callback_list,
            shuffle=False,  # the tile stream is already random
            verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in logs
        )
    with io.atomic_path(run.last_model(task_id), overwrite=True) as temporary:
        model_file.save(model, temporary, config)
    if task_id is None:
        _summary(run, train)
    return history


def keeps_last_epoch(train: TrainConfig) -> bool:
    """Whether best.keras is the last epoch's model: nothing held out chose it."""
    return train.include_validation or train.select_by == "last"


def recorded_score(train: TrainConfig) -> str:
    """The validation score recorded beside best.keras (the loss where nothing is selected by a score)."""
    return "val_loss" if train.select_by == "last" else train.select_by


def _summary(run: RunDir, train: TrainConfig) -> None:
    record, score = json.loads(run.best_record.read_text()), recorded_score(train)
    # With the last epoch kept, its value chose nothing.
    kept = "last epoch" if keeps_last_epoch(train) else "best"
    print(
        f"{kept} {score} {record[score]:.6g} (epoch {record['epoch']}) -> {run.best_model}; "
        f"TensorBoard: tensorboard --logdir {run.logs}"
    )
