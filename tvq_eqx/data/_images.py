"""Images as byte sequences (ImageNet64-style): one image is one document."""

import os
from pathlib import Path

import numpy as np
from jaxtyping import Int, UInt8

from ._bytes import check_regular
from ._files import find_files
from ._stream import AbstractStream, _check_int, _Lookup

IMAGE_SIZE = 64
"""Side of the square images of ImageNet64."""

IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
"""Bytes per flattened 64x64 RGB image: 12,288."""

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)
"""File suffixes that `load_images` reads from a folder (case-insensitive)."""


def load_images(
    path: str | os.PathLike[str],
    *,
    size: int = IMAGE_SIZE,
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
) -> UInt8[np.ndarray, "n d"]:
    """Load images as flattened `size x size` RGB byte vectors.

    Each image is converted to RGB, scaled so that its shorter side is `size`
    and center-cropped to `size x size` (`PIL.ImageOps.fit` with box
    resampling, i.e. area averaging as used for downsampled ImageNet), then
    flattened row-major with the channels interleaved:
    `[r00, g00, b00, r01, g01, b01, ...]`. View an image again with
    `row.reshape(size, size, 3)`.

    **Arguments:**

    - `path`: a folder, searched recursively for files with a suffix in
      `suffixes` (hidden entries skipped) and read in sorted order of relative
      path; or a single image file.
    - `size`: output side in pixels (64 for ImageNet64).
    - `suffixes`: image file suffixes, compared case-insensitively.

    **Returns:**

    `uint8` array of shape `[num_images, size * size * 3]`.
    """
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError as e:
        raise ImportError(
            "load_images needs Pillow, which the `images` extra installs: "
            "`pip install 'tvq-eqx[images]'` (or `pip install pillow`)"
        ) from e
    size = _check_int("size", size, minimum=1)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image path {str(root)!r} does not exist")
    check_regular(root, "image path")
    files = find_files(root, suffixes) if root.is_dir() else [root]
    if not files:
        raise ValueError(
            f"folder {str(root)!r} contains no images with suffix in {suffixes}"
        )
    out = np.empty((len(files), size * size * 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                rgb = ImageOps.fit(
                    im.convert("RGB"),
                    (size, size),
                    method=Image.Resampling.BOX,
                    centering=(0.5, 0.5),
                )
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            # DecompressionBombError: more pixels than Pillow's safety limit
            # (Image.MAX_IMAGE_PIXELS; raise it to read such files).
            raise ValueError(f"cannot read image {str(f)!r}: {e}") from None
        out[i] = np.asarray(rgb, dtype=np.uint8).reshape(-1)
    return out


class ImageStream(AbstractStream):
    """Batches of whole images, each image a document, with carried state.

    Every row of a batch is a stream of whole images laid end to end: in epoch
    `e` the images are put in the order `default_rng((seed, e)).permutation`
    (or in their given order if `shuffle=False`), and row `b` gets images
    `K * b` to `K * (b + 1) - 1` of that order, `K = ceil(num_images / B)`
    (missing ones at the end are padding). As for `TokenStream`, batch `s` of
    an epoch is window `s` of each row and targets are inputs shifted by one.

    `seq_len` must divide or be a multiple of the image length `d` (12,288 for
    64x64 RGB), so images never straddle windows unevenly:

    - `seq_len == d` (default): every row of `inputs` is exactly one image;
      the last target of a row is the first byte of the next image.
    - `seq_len == d / k`: each image spans `k` consecutive steps of the same
      row (carry the state through them).
    - `seq_len == k * d`: `k` images per row per step, told apart by `doc_ids`.

    `doc_ids` numbers image slots in the epoch's order (`K * b + i` for the
    `i`-th image of row `b`), so they increase along each row and change
    exactly at image boundaries (`doc_starts` marks every image's first
    byte, and the first padding position). The first byte of each row's
    first image is never a target; the first byte of every other image is
    predicted at the last position of the image before it.

    **Arguments:**

    - `images`: `uint8` array `[num_images, ...]`, each image flattened to `d`
      bytes (e.g. from `load_images`, or a `np.memmap` of ImageNet64).
    - `batch_size`: rows `B`; needs `num_images >= B`.
    - `seq_len`: window length `T`; defaults to one image.
    - `seed`, `shuffle`, `repeat`, `pad_id`: as for `TokenStream`.
    """

    images: UInt8[np.ndarray, "n d"]

    def __init__(
        self,
        images: UInt8[np.ndarray, "n *rest"],
        *,
        batch_size: int,
        seq_len: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        pad_id: int = 0,
    ):
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(
                f"images must be [num_images, ...] with num_images > 0, got "
                f"shape {images.shape}"
            )
        flat = images.reshape(images.shape[0], -1)
        n, d = (int(x) for x in flat.shape)
        if seq_len is None:
            seq_len = d
        self._init_common(
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
            shuffle=shuffle,
            repeat=repeat,
            pad_id=pad_id,
        )
        if d % self.seq_len and self.seq_len % d:
            raise ValueError(
                f"seq_len {self.seq_len} must divide or be a multiple of the "
                f"image length {d}"
            )
        if n < self.batch_size:
            raise ValueError(f"{n} images are fewer than batch_size {self.batch_size}")
        self.images = flat
        self._per_row = -(-n // self.batch_size)
        self._row_len = self._per_row * d
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def _order(self, epoch: int) -> Int[np.ndarray, " n"]:
        if not self.shuffle:
            return np.arange(self.num_images)
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = self._rng(epoch).permutation(self.num_images)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _lookup(self, epoch: int, pos: Int[np.ndarray, " P"]) -> _Lookup:
        n, d = self.images.shape
        order = self._order(epoch)
        rows = np.arange(self.batch_size, dtype=np.int64)[:, None]
        slot = rows * self._per_row + pos[None, :] // d
        valid = (pos[None, :] < self._row_len) & (slot < n)
        image = order[np.where(valid, slot, 0)]
        tokens = self.images[image, np.broadcast_to(pos % d, image.shape)]
        return tokens, valid, slot
