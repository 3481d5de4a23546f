"""Settings of the training process: the seed, TensorFlow's op determinism, what this CPU makes of a
precision, keeping freed memory; `configure_process` makes them all, in one place, for the rest of
the process."""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf
from tensorflow.python.framework import config as tf_framework_config  # disable_op_determinism: no public name

from pipeline.config.schema import TrainConfig
from pipeline.training import allocator


def configure_process(train: TrainConfig) -> None:
    """Changes process-wide state for a training: seeds Python's, numpy's and TensorFlow's random
    generators with `train.seed`, turns TensorFlow's op determinism on (off for
    `train.jit_compile`), notes a mixed precision this CPU emulates, and keeps freed memory
    (`train.keep_freed_memory`, `allocator`); each lasts until the process ends.

    Call it after anything that draws random numbers which the run's stream must not
    depend on (loading the initial weights), right before the training's own data and model.
    """
    keras.utils.set_random_seed(train.seed)
    set_determinism(train)
    precision_notice(train)
    if train.keep_freed_memory and not allocator.keep_freed_memory():
        print("notice: train.keep_freed_memory needs glibc's malloc, which this system does not have; "
              "training frees memory as usual", flush=True)


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
