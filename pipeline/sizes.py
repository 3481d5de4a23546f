"""The U-Net's size arithmetic: which tile sizes pass through the network, its output size, context and alignment.

Valid (unpadded) 3x3 convolutions shrink a side by 4 px per pair, and every 2x2
max-pooling must see an even size, so only some input sizes are valid: going up from the
bottom level, each level doubles its side and adds a pair's loss, so the valid sizes are
the smallest one plus multiples of the alignment 2^(depth-1). `padding="same"`
convolutions lose nothing: the valid sizes are the multiples of the alignment, and the
network needs no context.

Plain Python, without TensorFlow or Keras: the configuration is checked with these rules
before either is loaded.
"""

from __future__ import annotations

from pipeline.errors import PipelineError

PADDINGS = ("valid", "same")


def _pair_loss(padding: str) -> int:
    """How much a pair of 3x3 convolutions shrinks a side: 4 px if valid (1 px per edge each), else 0."""
    return 4 if padding == "valid" else 0


def _shrink_through(size: int, depth: int, padding: str = "valid") -> int | None:
    """Output side for an input side, or None if some pooling sees an odd size."""
    loss = _pair_loss(padding)
    for _ in range(depth - 1):
        size -= loss
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= loss
    if size <= 0:
        return None
    for _ in range(depth - 1):
        size = 2 * size - loss
    return size if size > 0 else None


def _from_bottom(bottom: int, depth: int, padding: str) -> int:
    """The input side whose contracting path gives the bottom level a side of `bottom`."""
    loss = _pair_loss(padding)
    return (bottom + loss) * alignment(depth) - loss


def smallest_input_size(depth: int, padding: str = "valid") -> int:
    """The smallest tile side that passes through a U-Net of `depth` levels (188 for depth 5)."""
    bottom = 1
    # A larger bottom side only makes every side of the expanding path larger, so the
    # first bottom side that survives it gives the smallest input.
    while _shrink_through(_from_bottom(bottom, depth, padding), depth, padding) is None:
        bottom += 1
    return _from_bottom(bottom, depth, padding)


def is_valid_input_size(size: int, depth: int, padding: str = "valid") -> bool:
    """Whether a tile side of `size` pixels passes through a U-Net of `depth` levels."""
    return _shrink_through(size, depth, padding) is not None


def output_size(input_size: int, depth: int, padding: str = "valid") -> int:
    """The side of the output map for an input tile side (572 -> 388 for the paper's net)."""
    check_input_size(input_size, depth, padding)
    return _shrink_through(input_size, depth, padding)


def context(depth: int, padding: str = "valid") -> int:
    """Pixels of input context the network needs on each side of its output (92 for depth 5)."""
    # Output = input - 2 * context for every valid input; take the smallest valid one.
    smallest = smallest_input_size(depth, padding)
    return (smallest - _shrink_through(smallest, depth, padding)) // 2


def alignment(depth: int) -> int:
    """Tile offsets must be multiples of this (2^(depth-1)) for pooling grids to agree."""
    return 2 ** (depth - 1)


def _first_valid(low: int, depth: int, padding: str) -> int:
    """The smallest valid input side of at least `low`."""
    smallest, step = smallest_input_size(depth, padding), alignment(depth)
    return smallest + max(0, -(-(low - smallest) // step)) * step


def valid_input_sizes(depth: int, low: int, high: int, padding: str = "valid") -> list[int]:
    """All valid input sides in [low, high]."""
    return list(range(_first_valid(low, depth, padding), high + 1, alignment(depth)))


def input_size_problem(size: int, depth: int, padding: str = "valid") -> str | None:
    """Why a tile side of `size` pixels does not pass through the network, or None if it does.

    The answer completes an error message about the field or argument that holds `size`.
    """
    if is_valid_input_size(size, depth, padding):
        return None
    smallest, step = smallest_input_size(depth, padding), alignment(depth)
    if size < smallest:
        reason = f"the smallest valid size is {smallest}"
    else:
        below = size - (size - smallest) % step
        reason = f"every pooling needs an even size; nearest valid sizes: {below} and {below + step}"
    return f"not a valid tile size for a U-Net of depth {depth} ({reason})"


def check_input_size(size: int, depth: int, padding: str = "valid") -> None:
    """Raises a one-line error naming the nearest valid sizes if `size` is not valid."""
    problem = input_size_problem(size, depth, padding)
    if problem:
        raise PipelineError(f"input size {size}: {problem}")


def prediction_tile_problem(tile_size: int, depth: int, padding: str = "valid") -> str | None:
    """Why overlap-tile prediction cannot use tiles of this side, or None if it can.

    Tile offsets must be multiples of the alignment, so a tile must also yield at least
    that many output pixels.
    """
    problem = input_size_problem(tile_size, depth, padding)
    if problem:
        return problem
    out, align = output_size(tile_size, depth, padding), alignment(depth)
    if out >= align:
        return None
    smallest = _first_valid(2 * context(depth, padding) + align, depth, padding)
    return (
        f"gives a {out}-pixel output at depth {depth}, less than the tile alignment {align}; "
        f"the smallest usable tile size is {smallest}"
    )


def skip_crops(depth: int, padding: str = "valid") -> list[int]:
    """Pixels cropped from each side of each level's skip connection, top level first.

    The difference between a skip connection and the up-sampled map it joins does not
    depend on the input size, so fixed crops work with spatial dimensions of None.
    """
    size = smallest_input_size(depth, padding)
    loss = _pair_loss(padding)
    skips = []
    for _ in range(depth - 1):
        skips.append(size - loss)
        size = (size - loss) // 2
    size -= loss
    crops = []
    for skip in reversed(skips):
        size = 2 * size
        crops.append((skip - size) // 2)
        size -= loss
    return crops[::-1]
