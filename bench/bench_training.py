"""Training throughput: tiles per second and achieved GFLOP/s against a large matmul.

Side by side in one run: the machine's practical peak (a 4096x4096 float32 matmul), then
`model.fit` steps of the `cpu` and `paper` presets (or of a data set's recipe for one, as
`cpu/isbi2012`: the network and tiles that ISBI 2012 trains with) under MirroredStrategy
with 1 and 2 replicas (logical devices on the CPU), with TensorFlow's thread pools at
their default size or set (for example `--threads default 2x1`: 2 intra-op threads, 1
inter-op thread), with freed memory kept in the process (`train.keep_freed_memory`,
pipeline/training/allocator.py) or returned to the kernel as glibc does by default (`--freed-memory
kept returned`), and in float32 or mixed precision (`train.precision`, `--precisions
float32 mixed_bfloat16`: the convolutions in bfloat16, which oneDNN runs natively on CPUs
with AVX512-BF16 or AMX and emulates on others). Each configuration runs in fresh
processes (`--processes`, default 2), since logical devices and thread pools are fixed
when TensorFlow starts, and since on a 2-core virtual machine one process can run its
whole life at half the speed of the next: the table shows the fastest and the slowest.
Every process also reports the CPU time of its steps, split into user and system (kernel)
time, and its page faults: how many cores a step keeps busy, what share the kernel takes
and how much fresh memory it had to hand out.
Tiles come from memory, so the figures are the training step's, not the input pipeline's
(see bench_input_pipeline.py). Steps are timed inside one `fit`, after warm-up steps and
before its end, as a long training run sees them. After the timed steps TensorFlow's
profiler traces a few more, and a second table shows where a step's time goes: the
milliseconds of each convolution kernel family and of the rest.

FLOPs per tile: the forward pass's float operations counted by TensorFlow's profiler on
the traced graph, times 3 for forward + backward (the usual estimate for convolutions).

    PYTHONPATH=. python bench/bench_training.py [--presets cpu paper cpu/isbi2012] [--replicas 1 2]
        [--threads default] [--freed-memory kept] [--precisions float32 mixed_bfloat16]
        [--processes 2] [--steps N]
        [--matmul-size 4096] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from pipeline.config.schema import PRECISIONS

# TensorFlow is imported inside the functions: each configuration's process must set up
# its logical devices before TensorFlow starts, and run_all imports this module for `render`.

STEPS = {"cpu": 40, "paper": 3}  # timed steps per preset: 5 to 20 s each on 2 cores
WARM_UP_STEPS = 2  # the first traces the step, the second still sets up kernels; neither is timed
# What every process of one configuration shares; the measured figures stay per process.
CONFIGURATION_KEYS = ("preset", "replicas", "threads", "freed_memory", "precision", "steps", "batch", "tile",
                      "flops_per_tile")


def matmul_gflops(size: int = 4096, repeats: int = 10, dtype: str = "float32") -> float:
    """GFLOP/s of a size x size matmul in `dtype` on the CPU, the best the machine does in it."""
    import tensorflow as tf

    # On the CPU even where a GPU is present: the replicas measured against it are CPU devices.
    with tf.device("/cpu:0"):
        a = tf.cast(tf.random.normal([size, size]), dtype)
        product = tf.function(lambda x: tf.matmul(x, x))
        product(a).numpy()
        start = time.perf_counter()
        for _ in range(repeats):
            product(a).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_flops(model: Any, tile: int, channels: int) -> int:
    """Float operations of one forward pass over one tile, counted by TensorFlow's profiler."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, tile, tile, channels])
    ).graph
    options = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
    options = options.with_empty_output().build()
    return model_analyzer.profile(graph, options=options).total_float_ops


def step_clock(warm_up: int, timed: int, profiled: int, logdir: str) -> Any:
    """A Keras callback: wall clock and resource usage after `warm_up` steps and after `timed` more.

    The timing lies inside one `model.fit`, so that neither tracing nor the end of `fit` is
    timed: tearing down an endless dataset's iterator after `fit` sometimes idles for 1 to
    30 s on this machine, which timing the whole call counted as training time. The
    `profiled` steps after the timed ones are traced by TensorFlow's profiler into `logdir`.
    """
    import keras
    import tensorflow as tf

    class StepClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.start: tuple[float, Any] | None = None
            self.end: tuple[float, Any] | None = None

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            mark = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF))
            if batch + 1 == warm_up:
                self.start = mark
            elif batch + 1 == warm_up + timed:
                self.end = mark
                tf.profiler.experimental.start(logdir)
            elif batch + 1 == warm_up + timed + profiled:
                tf.profiler.experimental.stop()

    return StepClock()


# A step's kernels, by the op type TensorFlow's profiler names them with (oneDNN's
# `_MklNative...` or Eigen's). Up-convolutions run forward as Conv2DBackpropInput and
# backward as Conv2D + Conv2DBackpropFilter, so each family also holds some of the others' work.
KERNEL_FAMILIES = (("Conv2DBackpropFilter", "weight gradients (Conv2DBackpropFilter)"),
                   ("Conv2DBackpropInput", "input gradients (Conv2DBackpropInput)"),
                   ("Conv2D", "forward convolutions (Conv2D)"),
                   ("StridedSliceGrad", "skip-crop gradients (StridedSliceGrad)"))
OTHER_KERNELS = "everything else"


def kernel_seconds(logdir: str, steps: int) -> dict[str, float]:
    """Seconds a step spent in each kernel family, summed over the threads that ran them.

    Read from the profiler's trace: every op event of TensorFlow's compute threads, named
    `path/to/op:OpType`.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    seconds = {name: 0.0 for _, name in KERNEL_FAMILIES} | {OTHER_KERNELS: 0.0}
    for path in Path(logdir).rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
        for plane in space.planes:
            names = {key: metadata.name for key, metadata in plane.event_metadata.items()}
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                for event in line.events:
                    op_path, colon, op_type = names[event.metadata_id].rpartition(":")
                    if not colon or ":" in op_path:  # executor bookkeeping, not an op
                        continue
                    family = next((name for key, name in KERNEL_FAMILIES if key in op_type), OTHER_KERNELS)
                    seconds[family] += event.duration_ps / 1e12 / steps
    return seconds


def convolutions_alone(model: Any, batch: int, tile: int, seconds: float = 0.3) -> dict[str, float]:
    """Each convolution of `model` timed alone over a batch: its forward pass and its gradients.

    Every Conv2D and Conv2DTranspose layer runs on the input it gets in a step of `batch`
    tiles of `tile` px, with the whole machine, one layer after the other: forward (with its
    bias and activation, as oneDNN fuses them in a step), the kernel's and bias's gradients,
    and, but for the first layer, whose input is the image, the input's gradient. Each
    repeats for at least `seconds`. Returns {"seconds": their sum per step, "flops": their
    float operations, counted from the shapes}.
    """
    import keras
    import tensorflow as tf

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]  # transposed too
    inputs = keras.Model(model.inputs, [layer.input for layer in layers])(tf.zeros([batch, tile, tile, 1]))
    total_seconds = total_flops = 0.0
    for index, (layer, x) in enumerate(zip(layers, inputs)):
        first = index == 0

        @tf.function
        def forward_backward(x: Any, layer: Any = layer, first: bool = first) -> Any:
            with tf.GradientTape() as tape:
                if not first:
                    tape.watch(x)
                y = layer(x)
            return tape.gradient(y, layer.trainable_weights if first else [x, *layer.trainable_weights],
                                 output_gradients=tf.ones_like(y))

        forward_backward(x)  # traces
        repeats, start = 0, time.perf_counter()
        while repeats < 3 or time.perf_counter() - start < seconds:
            for gradient in forward_backward(x):
                gradient.numpy()  # waits for it
            repeats += 1
        total_seconds += (time.perf_counter() - start) / repeats
        kernel_height, kernel_width, *channels = layer.kernel.shape
        # A transposed convolution's multiply-adds follow its input pixels, a convolution's its output's.
        grid = x.shape if isinstance(layer, keras.layers.Conv2DTranspose) else layer.compute_output_shape(x.shape)
        pixels = grid[1] * grid[2]
        forward = 2 * batch * pixels * kernel_height * kernel_width * channels[0] * channels[1]
        total_flops += forward * (2 if first else 3)
    return {"seconds": total_seconds, "flops": total_flops}


def child(preset_name: str, replicas: int, threads: str, freed_memory: str, precision: str,
          steps: int) -> dict[str, Any]:
    """One configuration, in this (fresh) process: tiles/s, CPU seconds and page faults per step, FLOPs per tile.

    `threads`: "default", or "IxJ" for I intra-op and J inter-op threads; `freed_memory`:
    "kept" (what training does by default) or "returned"; `precision`: `train.precision`.
    """
    import numpy as np
    import tensorflow as tf

    from pipeline.training import allocator

    if freed_memory == "kept" and not allocator.keep_freed_memory():
        raise RuntimeError("--freed-memory kept needs glibc's malloc")

    if threads != "default":
        intra, inter = map(int, threads.split("x"))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    from pipeline.config import resolve as configuration
    from pipeline.sizes import output_size
    from pipeline.training.model import compiled_model

    config = configuration.preset(*preset_name.split("/"))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    tile, depth = config.train.tile_size, config.model.depth
    batch = max(config.train.batch_size, replicas)  # every replica gets at least one tile
    out = output_size(tile, depth)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    with strategy.scope():
        model = compiled_model(config)
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensors((
        rng.normal(size=(batch, tile, tile, 1)).astype("float32"),
        rng.integers(0, 2, (batch, out, out)).astype("int32"),
        rng.uniform(1, 10, (batch, out, out)).astype("float32"),
    )).repeat()
    profiled = max(1, steps // 4)
    with tempfile.TemporaryDirectory() as logdir:
        clock = step_clock(WARM_UP_STEPS, steps, profiled, logdir)
        model.fit(data, steps_per_epoch=WARM_UP_STEPS + steps + profiled, epochs=1, verbose=0, callbacks=[clock])
        kernels = kernel_seconds(logdir, profiled)
    # Replicas share the cores, so the layers alone would time the same: measured with one replica only.
    alone = convolutions_alone(model, batch, tile) if replicas == 1 else None
    (start, before), (end, after) = clock.start, clock.end
    seconds = end - start
    return {"preset": preset_name, "replicas": replicas, "threads": threads, "freed_memory": freed_memory,
            "precision": precision, "steps": steps, "batch": batch, "tile": tile,
            "tiles_per_second": steps * batch / seconds,
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "peak_rss_mib": after.ru_maxrss / 1024,
            "user_seconds_per_step": (after.ru_utime - before.ru_utime) / steps,
            "system_seconds_per_step": (after.ru_stime - before.ru_stime) / steps,
            "seconds_per_step": seconds / steps, "flops_per_tile": 3 * forward_flops(model, tile, 1),
            "kernel_seconds_per_step": kernels, "convolutions_alone": alone}


def measure(presets: list[str], replica_counts: list[int], thread_settings: list[str], freed_memory: list[str],
            precisions: list[str], processes: int = 2, steps: int | None = None, matmul_size: int = 4096,
            matmul_repeats: int = 10) -> dict[str, Any]:
    """The matmul peak in this process, then every configuration in `processes` fresh ones.

    A configuration: (preset, replicas, threads, freed memory, precision). Where a mixed
    precision is among them, the matmul is also timed in its 16-bit type, so that its
    table rows can be read against what the machine does in that type too.

    The processes of one configuration are not run back to back but round by round, so that
    a slow spell of the machine does not fall on one configuration only. `steps` overrides
    the timed steps of every preset (default: STEPS).
    """
    peaks = [matmul_gflops(matmul_size, matmul_repeats)]
    print(f"  {matmul_size}x{matmul_size} float32 matmul: {peaks[0]:.0f} GFLOP/s", flush=True)
    half_types = sorted({precision.removeprefix("mixed_") for precision in precisions if precision != "float32"})
    half_peaks = {dtype: matmul_gflops(matmul_size, matmul_repeats, dtype) for dtype in half_types}
    for dtype, gflops in half_peaks.items():
        print(f"  {matmul_size}x{matmul_size} {dtype} matmul: {gflops:.0f} GFLOP/s", flush=True)
    configurations = [(preset, replicas, threads, memory, precision) for preset in presets
                      for replicas in replica_counts for threads in thread_settings for memory in freed_memory
                      for precision in precisions]
    runs: dict[tuple, list[dict]] = {configuration: [] for configuration in configurations}
    for _ in range(processes):
        for configuration in configurations:
            preset, replicas, threads, memory, precision = configuration
            timed = steps or STEPS[preset.partition("/")[0]]
            arguments = ["--child", preset, str(replicas), threads, memory, precision, str(timed)]
            run = common.run_json(Path(__file__), arguments)
            runs[configuration].append(run)
            print(f"  {preset:6s} {replicas} replica(s), threads {threads}, freed memory {memory}, {precision}: "
                  f"{run['tiles_per_second']:.2f} tiles/s, {run['user_seconds_per_step']:.3f} s user + "
                  f"{run['system_seconds_per_step']:.3f} s system in {run['seconds_per_step']:.3f} s a step, "
                  f"{run['page_faults_per_step']:.0f} page faults a step", flush=True)
    # Again at the end: a virtual machine's slow spell during the first measurement would
    # otherwise flatter every percentage.
    peaks.append(matmul_gflops(matmul_size, matmul_repeats))
    print(f"  {matmul_size}x{matmul_size} float32 matmul, again: {peaks[1]:.0f} GFLOP/s", flush=True)
    return {"cores": len(os.sched_getaffinity(0)), "steps": steps, "processes": processes,
            "matmul_size": matmul_size, "matmul_repeats": matmul_repeats, "matmul_gflops": max(peaks),
            "matmul_gflops_before_and_after": peaks, "matmul_gflops_16_bit": half_peaks,
            "rows": [{key: runs[c][0][key] for key in CONFIGURATION_KEYS} | {"runs": runs[c]} for c in configurations]}


def _speeds(row: dict[str, Any]) -> list[float]:
    """Tiles/s of every process of one configuration, slowest first."""
    return sorted(run["tiles_per_second"] for run in row["runs"])


def _range(values: list[float], fmt: str) -> str:
    """'a' when every process measured the same, else 'lowest-highest'."""
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}-{high}"


def _mean(row: dict[str, Any], key: str) -> float:
    return sum(run[key] for run in row["runs"]) / len(row["runs"])


def render(results: dict[str, Any]) -> str:
    """The markdown section: how it is measured, the peak, the table, what each dimension changes."""
    peak, size, rows = results["matmul_gflops"], results["matmul_size"], results["rows"]
    table = []
    for row in rows:
        speeds = _speeds(row)
        busy = [(run["user_seconds_per_step"] + run["system_seconds_per_step"]) / run["seconds_per_step"]
                for run in row["runs"]]
        cpu_time = _mean(row, "user_seconds_per_step") + _mean(row, "system_seconds_per_step")
        table.append([row["preset"], str(row["replicas"]), row["threads"], row["freed_memory"], row["precision"],
                      str(row["batch"]),
                      str(row["tile"]), f"{row['flops_per_tile'] / 1e9:.1f}", _range(speeds, ".2f"),
                      _range([100 * speed * row["flops_per_tile"] / 1e9 / peak for speed in speeds], ".0f") + "%",
                      _range(busy, ".2f"), f"{_mean(row, 'system_seconds_per_step') / cpu_time:.0%}",
                      f"{_mean(row, 'page_faults_per_step'):,.0f}", f"{_mean(row, 'peak_rss_mib'):,.0f}"])
    dimensions = {name: list(dict.fromkeys(row[name] for row in rows))
                  for name in ("preset", "replicas", "threads", "freed_memory", "precision")}
    timed = {row["preset"]: row["steps"] for row in rows}
    command = (f"PYTHONPATH=. python bench/bench_training.py --presets {' '.join(dimensions['preset'])} "
               f"--replicas {' '.join(map(str, dimensions['replicas']))} --threads {' '.join(dimensions['threads'])} "
               f"--freed-memory {' '.join(dimensions['freed_memory'])} "
               f"--precisions {' '.join(dimensions['precision'])} --processes {results['processes']} "
               f"--matmul-size {size} --matmul-repeats {results['matmul_repeats']}")
    if results["steps"] is not None:
        command += f" --steps {results['steps']}"
    sections = [
        "## Training throughput against the machine's peak",
        f"`{command}`",
        common.paragraph(
            f"The peak is a {size}x{size} float32 matmul measured in the same run, before and after the "
            "training runs; each configuration runs "
            f"`model.fit` under `MirroredStrategy` in {results['processes']} fresh process(es) "
            "(n replicas = n logical CPU devices; threads IxJ = I intra-op and J inter-op threads; freed memory "
            "kept by glibc for the next step, as training does, or returned to the kernel), on tiles held in "
            "memory (the input pipeline has its own section), timing "
            + ", ".join(f"{common.count(steps, 'step')} for `{preset}`" for preset, steps in timed.items())
            + f" after {common.count(WARM_UP_STEPS, 'warm-up step')} in the same `fit` (neither the warm-up "
            "nor the end of `fit` is timed: tearing down an endless dataset's iterator sometimes idles for "
            "seconds). Ranges go from the slowest process to the fastest. FLOPs per tile: the "
            "forward graph's float operations counted by TensorFlow's profiler, times 3 for forward + backward. "
            "Cores busy: the CPU time of the timed steps (user + system) over their wall time; system share: "
            "the kernel's part of that CPU time; page faults and peak resident memory: means over the "
            "processes."),
        "{}x{} float32 matmul on the CPU: {:.0f} GFLOP/s before the training runs, {:.0f} after; the percentages "
        "are of the higher, for every precision.".format(size, size, *results["matmul_gflops_before_and_after"])
        + "".join(f" The same matmul in {dtype}: {gflops:.0f} GFLOP/s ({gflops / peak:.2f}x float32)."
                  for dtype, gflops in results["matmul_gflops_16_bit"].items()),
        common.markdown_table(["preset", "replicas", "threads", "freed memory", "precision", "global batch", "tile",
                               "GFLOP/tile (train)", "tiles/s", "of float32 matmul peak", "cores busy",
                               "system share", "page faults a step", "peak RSS, MiB"], table, "lrlllrrrrrrrrr"),
    ]
    if len(dimensions["replicas"]) > 1:
        sections.append(_replicas(results))
    sections.append(_kernels(rows, peak))
    return "\n\n".join(sections)


def _kernels(rows: list[dict[str, Any]], peak: float) -> str:
    """Where a step's time goes, for each preset's and precision's first configuration: ms per kernel family.

    Beside it, the step's convolutions timed alone (`convolutions_alone`), against `peak`.
    """
    firsts: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        firsts.setdefault((row["preset"], row["precision"]), row)
    families = [name for _, name in KERNEL_FAMILIES] + [OTHER_KERNELS]
    table = []
    for row in firsts.values():
        per_family = {name: sum(run["kernel_seconds_per_step"][name] for run in row["runs"]) / len(row["runs"])
                      for name in families}
        total = sum(per_family.values())
        alone = [run["convolutions_alone"] for run in row["runs"] if run.get("convolutions_alone")]
        alone_cells = ["-", "-"]
        if alone:
            alone_cells = [_range([1000 * a["seconds"] for a in alone], ",.0f"),
                           _range([100 * a["flops"] / a["seconds"] / 1e9 / peak for a in alone], ".0f") + "%"]
        table.append([row["preset"], f"{row['replicas']}, {row['threads']}, {row['freed_memory']}, {row['precision']}",
                      f"{1000 * _mean(row, 'seconds_per_step'):,.0f}"]
                     + [f"{1000 * per_family[name]:,.0f} ({per_family[name] / total:.0%})" for name in families]
                     + [f"{total / _mean(row, 'seconds_per_step'):.2f}"] + alone_cells)
    return "\n\n".join([
        "### Where a step's time goes",
        common.paragraph(
            "TensorFlow's profiler traced a quarter as many steps again after the timed ones, in the same `fit`; "
            "each op's wall time is summed by kernel family, in milliseconds a step (share of all op time). "
            "Ops at once: all op time over the step's wall time. Ops that run at once share the cores, as a "
            "layer's two gradient convolutions do, so the columns say where a step's time goes, not how fast "
            "each kernel is. Up-convolutions run forward as Conv2DBackpropInput and backward as Conv2D and "
            "Conv2DBackpropFilter.",
            "Convolutions alone: after the training run, in the same process, each of the step's convolution "
            "layers ran by itself on the input it gets in a step, forward and backward (but for the first "
            "layer's input gradient, which training does not compute), with the whole machine, one layer after "
            "the other; the sum of their times (slowest-fastest process), and their float operations, counted "
            "from the shapes, over that time against the float32 matmul peak. A step whose convolutions ran "
            "as fast as they do alone, and did nothing else, would reach that percentage: scheduling "
            "the step differently can only approach it, unless ops running at once use the cores better "
            "than one op alone. Measured with one replica only."),
        common.markdown_table(["preset", "replicas, threads, freed memory, precision", "step, ms"] + families
                              + ["ops at once", "convolutions alone, ms", "alone, of float32 matmul peak"],
                              table, "llr" + "r" * len(families) + "rrr"),
    ])


def _replicas(results: dict[str, Any]) -> str:
    """What more replicas change, in measured tiles/s, and why little can be expected on a CPU."""
    first = results["rows"][0]
    rows = {(row["preset"], row["replicas"]): row for row in results["rows"]
            if (row["threads"], row["freed_memory"], row["precision"])
            == (first["threads"], first["freed_memory"], first["precision"])}
    presets = list(dict.fromkeys(preset for preset, _ in rows))
    fewest, most = min(replicas for _, replicas in rows), max(replicas for _, replicas in rows)

    def change(preset: str) -> str:
        gain = _speeds(rows[preset, most])[-1] / _speeds(rows[preset, fewest])[-1] - 1
        same_batch = rows[preset, most]["batch"] == rows[preset, fewest]["batch"]
        return f"`{preset}` {gain:+.0%} ({'same global batch' if same_batch else 'one tile per replica'})"

    sentences = [
        f"Logical devices share the same {results['cores']} CPU cores, so more replicas add no compute. "
        f"Fastest tiles/s with {most} replicas against {fewest} (threads {first['threads']}, freed memory "
        f"{first['freed_memory']}, {first['precision']}): {', '.join(map(change, presets))}.",
        "With the same global batch the change is the cost of splitting it; with one tile per replica, "
        "the replicas run their tiles at once, and a gain means that one tile's step alone left cores idle.",
        "These are CPU figures: the replicas are CPU devices even where a GPU is present.",
    ]
    if "paper" in presets:
        sentences.append("The `paper` preset is meant for GPUs.")
    return common.paragraph(*sentences)


def preset_setting(text: str) -> str:
    """Checks a --presets value: a preset, or PRESET/DATASET where the data set has a recipe for it."""
    from pipeline.data import DATASETS

    name, _, dataset = text.partition("/")
    if name not in STEPS:
        raise argparse.ArgumentTypeError(f"{text!r}: the preset must be one of {', '.join(STEPS)}")
    if dataset and name not in getattr(DATASETS.get(dataset), "recipes", {}):
        with_recipes = sorted(f"{name}/{key}" for key, value in DATASETS.items() if name in value.recipes)
        raise argparse.ArgumentTypeError(f"{text!r}: no recipe; with one: {', '.join(with_recipes) or 'none'}")
    return text


def thread_setting(text: str) -> str:
    """Checks a --threads value: "default" or "IxJ" with positive I and J."""
    intra, _, inter = text.partition("x")
    if text != "default" and not (intra.isdigit() and inter.isdigit() and int(intra) > 0 and int(inter) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: use default or IxJ, e.g. 2x1")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", type=preset_setting, default=["cpu", "paper", "cpu/isbi2012"],
                        help="presets, or PRESET/DATASET for a data set's recipe (cpu/isbi2012)")
    parser.add_argument("--replicas", nargs="+", type=int, default=[1, 2], help="replica counts to compare")
    parser.add_argument("--threads", nargs="+", type=thread_setting, default=["default"],
                        help="thread settings to compare: default, or IxJ (I intra-op, J inter-op threads)")
    parser.add_argument("--freed-memory", nargs="+", choices=["kept", "returned"], default=["kept"],
                        help="keep freed memory in the process (train.keep_freed_memory) or return it to the kernel")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["float32", "mixed_bfloat16"],
                        help="train.precision values to compare")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per configuration")
    parser.add_argument("--steps", type=int, help="timed steps for every preset (default: "
                        + ", ".join(f"{preset} {steps}" for preset, steps in STEPS.items()) + ")")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--matmul-repeats", type=int, default=10)
    parser.add_argument("--child", nargs=6, metavar=("PRESET", "REPLICAS", "THREADS", "MEMORY", "PRECISION", "STEPS"),
                        help=argparse.SUPPRESS)
    common.add_json_argument(parser)
    args = parser.parse_args()
    if args.child:
        preset, replicas, threads, memory, precision, steps = args.child
        common.finish(args.json, child(preset, int(replicas), threads, memory, precision, int(steps)), json.dumps)
        return
    results = measure(args.presets, args.replicas, args.threads, args.freed_memory, args.precisions, args.processes,
                      args.steps, args.matmul_size, args.matmul_repeats)
    common.finish(args.json, results, render)


if __name__ == "__main__":
    main()
