"""The chunk grid of an image larger than memory: the output boxes it is predicted and labelled in.

A chunk is a square output box of `chunk_side` pixels, a whole number of prediction tile
steps, aligned to the tile grid of the whole image (tile k of the whole-image pass starts
at k * step), so that a chunk's tiles are exactly the whole image's; the chunks of the
last row and column are clipped to the image. Chunks go in raster order. `large_image`
predicts and writes chunk by chunk, `chunked_labels` labels the cells over the same grid,
and the scratch arrays are chunked like it, so each chunk writes whole files of its own.
"""

from __future__ import annotations

import dataclasses

from pipeline.config.schema import Config
from pipeline.inference.tiling import tile_geometry


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One output box, aligned to the tile grid of the whole image, clipped to the image (pixels)."""

    row: int
    col: int
    height: int
    width: int

    @property
    def box(self) -> tuple[slice, slice]:
        """The chunk's rows and columns in the image: `image[chunk.box]`."""
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)


def geometry(config: Config) -> tuple[int, int, int]:
    """(output side, margin, step) of the prediction tiles."""
    return tile_geometry(config.predict.tile_size, config.model.depth, config.model.padding)


def chunk_side(config: Config) -> int:
    """The side of a chunk: `predict.chunk_size` rounded down to whole tile steps, at least one step."""
    step = geometry(config)[2]
    return max(step, config.predict.chunk_size // step * step)


def chunks(height: int, width: int, config: Config) -> list[Chunk]:
    """The chunks of an image of `height` x `width` pixels, in raster order."""
    return grid(height, width, chunk_side(config))


def grid(height: int, width: int, side: int) -> list[Chunk]:
    """The chunks of `side` pixels of an image, in raster order."""
    return [Chunk(row, col, min(side, height - row), min(side, width - col))
            for row in range(0, height, side) for col in range(0, width, side)]
