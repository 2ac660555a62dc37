"""A tiny learnable text -> image-code task written as token shards: the caption names a colour and a size, the
"image" is a 4x4 grid filled with the colour's code, with a border of code 15 when the caption says small."""
import torch

from dalle_ds.data.token_shards import ShardWriter, write_meta

COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan", "white", "orange"]
GRID, VOCAB = 4, 16


def _codes(caption: str) -> torch.Tensor:
    """A caption-determined image: colour c fills the grid with code c, 'small' leaves a border of code 15."""
    words = caption.split()
    codes = torch.full((GRID, GRID), COLOURS.index(words[-2]), dtype=torch.long)
    if words[1] == "small":
        codes[0, :], codes[-1, :], codes[:, 0], codes[:, -1] = 15, 15, 15, 15
    return codes


def write_unit_shards(out, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = ShardWriter(out, rank=0, grid_size=GRID, vocab_size=VOCAB, rows_per_shard=64)
    for i in range(n):
        size = ["small", "large"][int(torch.randint(2, (1,), generator=g))]
        colour = COLOURS[int(torch.randint(len(COLOURS), (1,), generator=g))]
        caption = f"a {size} {colour} square"
        w.add(_codes(caption)[None], [{"index": i, "caption": caption}])
    w.flush()
    write_meta(out, w.parts, GRID, VOCAB, {"dataset": "unit"})


def write_unit_splits(root, n_train: int, n_val: int):
    """``root/train`` (seed 0) and ``root/val`` (seed 1) shard folders; returns ``root``."""
    write_unit_shards(root / "train", n_train, 0)
    write_unit_shards(root / "val", n_val, 1)
    return root
