"""Training throughput: tiles per second and achieved GFLOP/s against a large matmul.

Side by side in one run: the machine's practical peak (a 4096x4096 float32 matmul), then
`model.fit` steps of the `cpu` and `paper` presets under MirroredStrategy with 1 and 2
replicas (2 logical devices on the CPU; each configuration runs in a process of its own,
since logical devices are fixed when TensorFlow starts). Tiles come from memory, so the
figures are the training step's, not the input pipeline's (see bench_input_pipeline.py).

FLOPs per tile: the forward pass's float operations counted by TensorFlow's profiler on
the traced graph, times 3 for forward + backward (the usual estimate for convolutions).

Run: PYTHONPATH=. python bench/bench_training.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

STEPS = {"cpu": 12, "paper": 2}


def matmul_gflops(size: int = 4096, repeats: int = 10) -> float:
    import tensorflow as tf

    a = tf.random.normal([size, size])
    product = tf.function(lambda x: tf.matmul(x, x))
    product(a).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        product(a).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def forward_flops(model, tile: int, channels: int) -> int:
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, tile, tile, channels])
    ).graph
    options = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
    options = options.with_empty_output().build()
    return model_analyzer.profile(graph, options=options).total_float_ops


def child(preset_name: str, replicas: int) -> dict:
    """One configuration, in this process: returns tiles/s and FLOPs per tile."""
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    from pipeline import config as configuration
    from pipeline.model import output_size
    from pipeline.train import compiled_model

    config = configuration.preset(preset_name)
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
    model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)  # trace and warm up
    steps = STEPS[preset_name]
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return {"tiles_per_second": steps * batch / seconds, "flops_per_tile": 3 * forward_flops(model, tile, 1),
            "batch": batch, "tile": tile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "REPLICAS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    peak = matmul_gflops()
    print(f"4096x4096 float32 matmul: {peak:.0f} GFLOP/s (the practical peak)")
    print("\n| preset | replicas | batch | tile | tiles/s | GFLOP/tile (train) | achieved GFLOP/s | of matmul peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset in ("cpu", "paper"):
        for replicas in (1, 2):
            output = subprocess.run([sys.executable, __file__, "--child", preset, str(replicas)],
                                    capture_output=True, text=True, check=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            achieved = row["tiles_per_second"] * row["flops_per_tile"] / 1e9
            print(f"| {preset} | {replicas} | {row['batch']} | {row['tile']} | {row['tiles_per_second']:.2f} "
                  f"| {row['flops_per_tile'] / 1e9:.1f} | {achieved:.1f} | {achieved / peak:.0%} |", flush=True)


if __name__ == "__main__":
    main()
