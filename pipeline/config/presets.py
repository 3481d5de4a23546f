"""Configuration: the named presets `paper`, `cpu` and `smoke`, as bare `Config`s.

A data set's recipe for a preset is applied on top by `pipeline.config.resolve.preset`;
the data sets check their recipes' preset names against `PRESETS`, so this module knows
no data set.
"""

from __future__ import annotations

import typing

from pipeline.config.schema import AugmentConfig, Config, ModelConfig, PredictConfig, TrainConfig


def _paper() -> Config:
    # The dataclass defaults are the paper's settings.
    return Config(preset="paper")


def _cpu() -> Config:
    return Config(
        preset="cpu",
        model=ModelConfig(depth=4, base_filters=16),
        # 400 steps: the first result within 3 minutes of training on a slow 2-core machine
        # (docs/results.md, "The first result"); Adam at 2e-3 comes near in them to what 1e-3 did in 750.
        train=TrainConfig(
            tile_size=188,
            batch_size=4,
            epochs=16,
            steps_per_epoch=25,
            optimizer="adam",
            learning_rate=2e-3,
        ),
        predict=PredictConfig(tile_size=508, tiles_per_batch=2),
    )


def _smoke() -> Config:
    return Config(
        preset="smoke",
        model=ModelConfig(depth=3, base_filters=8),
        train=TrainConfig(
            tile_size=92,
            batch_size=4,
            epochs=4,
            steps_per_epoch=15,
            optimizer="adam",
            learning_rate=1e-2,
            val_tiles_per_image=4,
        ),
        predict=PredictConfig(tile_size=92, tiles_per_batch=8),
        # Sixty steps are too few to profit from deformations and gray-value changes: with
        # them the test IoU ranged from 0.71 to 0.84 over train seeds 0-2.
        augment=AugmentConfig(rotate=False, elastic=False, brightness=0.0, contrast=0.0, gamma=0.0),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {"paper": _paper, "cpu": _cpu, "smoke": _smoke}
