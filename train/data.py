"""Training data: scikit-learn's handwritten digits (real images shipped inside the package) or an image folder.

Both yield uint8 RGB images at the model input size plus an integer label; normalisation happens in
`resnet_serve.imaging.normalise`, with the same mean/std that the manifest records for serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_serve.imaging import resize_crop

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
DIGITS = "digits"


class DatasetError(ValueError):
    pass


@dataclass
class Split:
    """Images (uint8 [N, H, W, 3]) with labels (int64 [N]) and the class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


def split(images: np.ndarray, labels: np.ndarray, classes: list[str], holdout: float,
          seed: int) -> tuple[Split, Split]:
    """(train, held-out): a seeded permutation, so training, export and the demo agree on the hold-out."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * holdout))
    test, train = order[:n_test], order[n_test:]
    return Split(images[train], labels[train], classes), Split(images[test], labels[test], classes)


def load_digits(size: int, holdout: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """The 1,797 8x8 digits of scikit-learn, upscaled to size x size RGB; a fixed, seeded hold-out split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    raw = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([resize_crop(Image.fromarray(im, "L"), size, size) for im in raw])
    return split(images, d.target.astype(np.int64), [str(i) for i in range(10)], holdout, seed)


def load_image_folder(root: Path, size: int, holdout: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """root/<class>/<image>: one subfolder per class, sorted names are class ids."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"dataset folder {root} holds no images in class subfolders ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                images.append(resize_crop(im, size, size))
        except OSError as e:
            raise DatasetError(f"cannot read image {f}: {e}") from e
    return split(np.stack(images), np.array([i for _, i in files], dtype=np.int64), classes, holdout, seed)


def load_dataset(data: str, size: int, holdout: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    if data == DIGITS:
        return load_digits(size, holdout, seed)
    return load_image_folder(Path(data), size, holdout, seed)


def write_images(split: Split, out: Path) -> int:
    """Write a split as PNG files under out/<class>/ (the demo's held-out images); returns the count."""
    out = Path(out)
    for i, (img, label) in enumerate(zip(split.images, split.labels, strict=True)):
        d = out / split.classes[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return len(split.labels)
