"""Clean images: loading, the pixel contract, 8-bit quantisation, and image sources.

The pixel contract (DESIGN.md §4): RGB, 224 × 224, values in [0, 1]; a clean image is resized
to 256 on the short side (bilinear, antialiased) and centre-cropped to 224. Stimuli are stored
and shown as 8-bit, so :func:`quantize` / :func:`dequantize` convert between the two.

Arrays in this module are numpy, channels last: one image is ``(224, 224, 3)``, a batch is
``(n_images, 224, 224, 3)``. :func:`to_tensor` gives the ``(n_images, 3, 224, 224)`` float
batch that models take.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from closedloop.core.validation import check_dir, check_indices, check_option

__all__ = [
    "IMAGE_SIZE",
    "RESIZE_SIZE",
    "ImageSet",
    "preprocess_image",
    "read_image",
    "quantize",
    "dequantize",
    "to_tensor",
    "from_tensor",
    "read_image_source",
    "make_embedded_image_set",
    "read_image_folder",
    "select_categories",
]

IMAGE_SIZE = 224
RESIZE_SIZE = 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")

# Photographs bundled inside scikit-image (no download), one category each.
EMBEDDED_PHOTOS = (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg",
    "ihc.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg", "brick.png", "grass.png",
    "gravel.png", "moon.png",
)


def _as_rgb_float(array: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) uint8/float image → (H, W, 3) float32 in [0, 1]."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image must have shape (H, W), (H, W, 3) or (H, W, 4), but got {array.shape}.")
    array = array[:, :, :3] if array.shape[2] == 4 else np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("a float image must hold finite values in [0, 1].")
    return array


def preprocess_image(array: np.ndarray, *, resize: int = RESIZE_SIZE, crop: int = IMAGE_SIZE) -> np.ndarray:
    """Resize the short side to ``resize`` (bilinear, antialiased) and centre-crop ``crop``.

    ``array``: one image, (H, W) or (H, W, 3|4), uint8 or float in [0, 1].
    Returns float32 (crop, crop, 3) in [0, 1].
    """

    image = torch.from_numpy(np.ascontiguousarray(_as_rgb_float(array).transpose(2, 0, 1)))
    image = F.resize(image, [resize], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    image = F.center_crop(image, [crop, crop])
    return image.clamp_(0.0, 1.0).numpy().transpose(1, 2, 0).copy()


def read_image(path: str | Path) -> np.ndarray:
    """Read any image file (RGB, grey, RGBA, palette) into the pixel contract.

    Returns float32 (224, 224, 3) in [0, 1].
    """

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from None
    return preprocess_image(array)


def quantize(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] → uint8 (round to nearest). Any shape."""
    images = np.asarray(images)
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values.")
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def dequantize(images: np.ndarray) -> np.ndarray:
    """uint8 images → float32 in [0, 1] (value / 255). Any shape."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"dequantize expects uint8 images, but got dtype {images.dtype}.")
    return images.astype(np.float32) / np.float32(255.0)


def to_tensor(images: np.ndarray, device=None):
    """(n_images, 224, 224, 3) uint8 or float in [0, 1] → torch float32 (n_images, 3, 224, 224)."""

    images = dequantize(images) if images.dtype == np.uint8 else np.asarray(images, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def from_tensor(images) -> np.ndarray:
    """torch (n_images, 3, H, W) in [0, 1] → numpy float32 (n_images, H, W, 3)."""
    return images.detach().float().cpu().numpy().transpose(0, 2, 3, 1).copy()


@dataclass(frozen=True)
class ImageSet:
    """A pool of clean images with categories.

    ``ids``: unique string id per image; ``categories``: int category index per image,
    shape (n_images,); ``category_names``: name per category; ``origin``: where the pool comes
    from and how it was made. Pixels are produced on demand by :meth:`read` as uint8
    (n, 224, 224, 3).
    """

    ids: tuple[str, ...]
    categories: np.ndarray
    category_names: tuple[str, ...]
    origin: str
    _reader: object

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, indices) -> np.ndarray:
        """uint8 pixels (len(indices), 224, 224, 3) of the images at ``indices``."""
        indices = check_indices("indices", indices, len(self))
        out = np.empty((len(indices), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for row, index in enumerate(indices):
            out[row] = self._reader(int(index))
        return out

    def digest(self) -> str:
        """sha256 of the origin, ordered image ids and categories (identifies the pool for provenance)."""
        rows = (f"{i}\t{self.category_names[c]}" for i, c in zip(self.ids, self.categories))
        text = "\n".join([self.origin, *rows])
        return hashlib.sha256(text.encode()).hexdigest()


def _read_embedded_photo(name: str) -> np.ndarray:

    with resources.as_file(resources.files("skimage.data") / name) as path, Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def make_embedded_image_set(per_photo: int = 40, seed: int = 0) -> ImageSet:
    """The embedded default: photographs shipped inside scikit-image, expanded by random crops.

    Each of the 14 photographs is one category; ``per_photo`` random crops (side 35–100 % of the
    photograph's short side, random position, random horizontal flip) are made from each,
    deterministically from ``seed``. Returns an :class:`ImageSet` of 14 × ``per_photo`` images.
    """
    rng = np.random.default_rng(seed)
    photos = {name: None for name in EMBEDDED_PHOTOS}
    crops = []
    for category, name in enumerate(EMBEDDED_PHOTOS):
        for index in range(per_photo):
            scale, fx, fy, flip = rng.uniform(0.35, 1.0), rng.uniform(), rng.uniform(), bool(rng.integers(2))
            crops.append((category, name, index, scale, fx, fy, flip))

    def reader(position: int) -> np.ndarray:
        category, name, _, scale, fx, fy, flip = crops[position]
        if photos[name] is None:
            photos[name] = _read_embedded_photo(name)
        photo = photos[name]
        side = max(16, int(round(scale * min(photo.shape[:2]))))
        top = int(fx * (photo.shape[0] - side))
        left = int(fy * (photo.shape[1] - side))
        crop = photo[top : top + side, left : left + side]
        crop = crop[:, ::-1] if flip else crop
        return quantize(preprocess_image(crop))

    stems = tuple(name.split(".")[0] for name in EMBEDDED_PHOTOS)
    ids = tuple(f"{stems[c]}/{i:03d}" for c, _, i, *_ in crops)
    categories = np.array([c for c, *_ in crops], dtype=np.int64)
    origin = f"embedded scikit-image photographs, per_photo={per_photo}, seed={seed}"
    return ImageSet(ids=ids, categories=categories, category_names=stems, origin=origin, _reader=reader)


def read_image_folder(root: str | Path) -> ImageSet:
    """An image pool in ImageFolder layout: ``root/<category>/<image file>``.

    Categories are the sub-folder names in sorted order (for ImageNet's ``train/`` these are the
    1000 synset ids, so category index = ImageNet class index). Files are listed, not read.
    """
    root = check_dir("images.source", root)
    names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    files, categories = [], []
    for category, name in enumerate(names):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        categories += [category] * len(found)
    if not files:
        raise ValueError(
            f"images.source {str(root)!r} holds no images in ImageFolder layout (root/<category>/<image>); "
            f"allowed extensions: {', '.join(IMAGE_EXTENSIONS)}."
        )
    ids = tuple(str(path.relative_to(root)) for path in files)
    return ImageSet(
        ids=ids,
        categories=np.array(categories, dtype=np.int64),
        category_names=tuple(names),
        origin=f"ImageFolder {root.resolve()}",
        _reader=lambda position: quantize(read_image(files[position])),
    )


def select_categories(image_set: ImageSet, names) -> ImageSet:
    """The images of ``image_set`` in the categories ``names``; category k of the result is ``names[k]``.

    Pixels are still read on demand. Refuses names that are not categories of ``image_set``.
    """
    names = tuple(str(name) for name in names)
    index = {name: k for k, name in enumerate(image_set.category_names)}
    missing = [name for name in names if name not in index]
    if missing or not names or len(set(names)) != len(names):
        raise ValueError(
            f"'names' must be distinct categories of the image set ({', '.join(image_set.category_names)}), "
            f"but got {list(names)}."
        )
    renumber = {index[name]: k for k, name in enumerate(names)}
    positions = [p for p, category in enumerate(image_set.categories) if int(category) in renumber]
    return ImageSet(
        ids=tuple(image_set.ids[p] for p in positions),
        categories=np.array([renumber[int(image_set.categories[p])] for p in positions], dtype=np.int64),
        category_names=names,
        origin=f"{image_set.origin}; categories {', '.join(names)}",
        _reader=lambda position: image_set._reader(positions[position]),
    )


def read_image_source(source: str, *, per_photo: int = 40, seed: int = 0) -> ImageSet:
    """The image pool named by ``[images] source``: ``"embedded"`` or an ImageFolder path."""
    if source == "embedded":
        return make_embedded_image_set(per_photo=per_photo, seed=seed)
    if not Path(source).expanduser().exists():
        check_option("images.source", source, ["embedded", "<an existing ImageFolder directory>"])
    return read_image_folder(source)
