"""Training data: scikit-learn's handwritten digits (real images shipped inside the package) or an image folder
streamed from disk. Pure numpy/PIL, no Paddle: the command line checks the data before Paddle starts.

An image folder follows torchvision's ImageFolder rules: `root/<class>/**/<image>`, sorted class names are class ids,
hidden files and folders are skipped, a class folder without images is no class, other files are skipped and listed
once. Images are decoded by `resnet_serve.common.imaging.decode` (the server's decoder) one at a time, when a DataLoader
worker asks for them, so memory does not grow with the folder. Evaluation uses exactly the serving transform
(decode at the model size, shorter side resize, centre crop); training adds the standard augmentation (random
resized crop + horizontal flip).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_serve.common.imaging import FORMAT_NAMES, HEADER_BYTES, SUFFIXES, decode_file, resize_crop, sniff

DIGITS = "digits"
IMAGE_SUFFIXES = frozenset(SUFFIXES)
MAX_LISTED = 20  # skipped entries named one per line; the rest counted
log = logging.getLogger(__name__)


class DatasetError(ValueError):
    pass


@dataclass
class Split:
    """Images (uint8 [N, H, W, 3]) with labels (int64 [N]) and the class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


@dataclass(frozen=True)
class Augment:
    """torchvision's RandomResizedCrop(scale=(crop_scale, 1), ratio=(3/4, 4/3)) and RandomHorizontalFlip(0.5)."""

    crop_scale: float = 0.08
    flip: bool = True

    def __str__(self) -> str:
        return f"random resized crop (scale {self.crop_scale}-1){' + horizontal flip' if self.flip else ''}"


class Source:
    """An indexable image collection: class names, int64 labels, and each image as an upright RGB PIL image."""

    classes: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int, size: int | None = None) -> Image.Image:
        """Image i as served; `size`, the model input, lets a JPEG decode at that scale like the server does."""
        raise NotImplementedError

    def full_image(self, i: int, size: int) -> Image.Image:
        """The image augmentation crops from: full resolution."""
        return self.image(i)

    def pixels(self, i: int, size: int, augment: Augment | None = None,
               rng: np.random.Generator | None = None) -> np.ndarray:
        """uint8 [size, size, 3]: the serving transform, or with `augment` a random resized crop (+ flip)."""
        if augment is None:
            return resize_crop(self.image(i, size), size, size)
        return random_resized_crop(self.full_image(i, size), size, augment, rng or np.random.default_rng())


class DigitsSource(Source):
    """The 1,797 8x8 digits of scikit-learn, upscaled to the input size like a PNG of them would be served."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits as sk_digits

        d = sk_digits()
        self.raw = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.labels = d.target.astype(np.int64)
        self.classes = [str(i) for i in range(10)]

    def image(self, i: int, size: int | None = None) -> Image.Image:
        return Image.fromarray(self.raw[i], "L")

    def full_image(self, i: int, size: int) -> Image.Image:
        # Cropping the 8x8 original would leave a few pixels: augmentation crops the digit at the input size.
        return Image.fromarray(resize_crop(self.image(i), size, size))


@dataclass
class FolderSource(Source):
    """An image folder scanned with ImageFolder's rules; holds paths only, decodes on demand."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path relative to root, why)

    def image(self, i: int, size: int | None = None) -> Image.Image:
        try:
            return decode_file(Path(self.paths[i]), (size, size) if size else None)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # a bomb: > 179 MP
            raise DatasetError(f"cannot read image {self.paths[i]}: {e}") from e

    def counts(self) -> dict[str, int]:
        return {c: int(n) for c, n in zip(self.classes, np.bincount(self.labels, minlength=len(self.classes)),
                                         strict=True)}


def _hidden(name: str) -> bool:
    return name.startswith(".")


def scan_folder(root: Path) -> FolderSource:
    """root/<class>/... -> FolderSource. Reads each image's first bytes (not its pixels) so a file that is not an
    image in a supported format is reported now, by name, rather than by a DataLoader worker mid-epoch."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
    skipped: list[tuple[str, str]] = []
    class_dirs = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _hidden(entry.name):
            skipped.append((entry.name, "hidden"))
        elif entry.is_dir():
            class_dirs.append(entry.name)
        else:
            skipped.append((entry.name, "not inside a class folder"))
    classes: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    for name in class_dirs:
        if not name.isprintable():  # undecodable bytes (surrogates), newlines, tabs: labels.txt is UTF-8 lines
            raise DatasetError(f"class folder {name!r} in {root} is not a printable UTF-8 name: rename it (class "
                               "folder names become the model's labels, one per line in labels.txt)")
        found, visited = [], set()
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            if os.path.realpath(dirpath) in visited:  # a symlink back up the tree: once is enough
                skipped.append((str(rel), "symlink loop"))
                dirnames[:] = []
                continue
            visited.add(os.path.realpath(dirpath))
            for d in sorted(dirnames):
                if _hidden(d):
                    skipped.append((str(rel / d), "hidden"))
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            for f in sorted(filenames):
                suffix = Path(f).suffix.lower()
                if _hidden(f):
                    skipped.append((str(rel / f), "hidden"))
                elif suffix not in IMAGE_SUFFIXES:
                    skipped.append((str(rel / f), f"not an image ({suffix or 'no extension'})"))
                else:
                    found.append(os.path.join(dirpath, f))
        if not found:
            skipped.append((name, "empty class folder"))
            continue
        for path in found:
            with open(path, "rb") as fh:
                if sniff(fh.read(HEADER_BYTES)) is None:
                    raise DatasetError(f"cannot read image {path}: not a {FORMAT_NAMES} file (unrecognised header)")
        label = len(classes)
        classes.append(name)
        paths.extend(found)
        labels.extend([label] * len(found))
    if not paths:
        raise DatasetError(f"dataset folder {root} holds no images in class subfolders "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(classes) < 2:
        raise DatasetError(f"dataset folder {root} has a single class ({classes[0]}): a classifier needs at least "
                           "2 class subfolders with images")
    return FolderSource(root, classes, paths, np.array(labels, np.int64), skipped)


def open_source(data: str, report: bool = True) -> Source:
    """'digits' or an image folder; report() says what a folder holds (once per run)."""
    if data == DIGITS:
        return DigitsSource()
    src = scan_folder(Path(data))
    if report:
        report_source(src)
    return src


def report_source(src: Source) -> None:
    """Log a folder's skipped entries (one line each, the first MAX_LISTED) and its per-class image counts."""
    if not isinstance(src, FolderSource):
        return
    for path, why in src.skipped[:MAX_LISTED]:
        log.warning("skipped %s (%s)", path, why)
    if len(src.skipped) > MAX_LISTED:
        log.warning("skipped %d more entries", len(src.skipped) - MAX_LISTED)
    log.info("classes (%d images): %s", len(src), ", ".join(f"{c} {n}" for c, n in src.counts().items()))


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a seeded permutation, so training, export and the demo agree on the hold-out."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * holdout))
    return order[n_test:], order[:n_test]


def random_resized_crop(img: Image.Image, size: int, augment: Augment, rng: np.random.Generator) -> np.ndarray:
    """torchvision's RandomResizedCrop (ten tries at a random area and aspect ratio, else a centre crop) to
    size x size, then a horizontal flip with probability 0.5 when augment.flip."""
    w, h = img.size
    area = w * h
    box = None
    for _ in range(10):
        target = area * rng.uniform(augment.crop_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (left, top, left + cw, top + ch)
            break
    if box is None:  # torchvision's fallback: a centre crop at the nearest allowed aspect ratio
        cw, ch = w, h
        if w / h < 3 / 4:
            ch = round(w / (3 / 4))
        elif w / h > 4 / 3:
            cw = round(h * (4 / 3))
        left, top = (w - cw) // 2, (h - ch) // 2
        box = (left, top, left + cw, top + ch)
    out = img.resize((size, size), Image.BILINEAR, box=box)
    if augment.flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def materialise(src: Source, indices: Iterable[int], size: int) -> Split:
    """The serving-transform pixels of some images, in memory (export's INT8 checks, the demo's held-out set)."""
    idx = np.asarray(list(indices), np.int64)
    images = np.stack([src.pixels(int(i), size) for i in idx]) if len(idx) else np.zeros((0, size, size, 3), np.uint8)
    return Split(images, src.labels[idx], list(src.classes))


def load_dataset(data: str, size: int, holdout: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """(train, held-out) in memory, at the serving transform: for small sets and export checks only."""
    src = open_source(data)
    train, test = split_indices(len(src), holdout, seed)
    return materialise(src, train, size), materialise(src, test, size)


def held_out(data: str, size: int, holdout: float = 0.2, seed: int = 0) -> Split:
    """The held-out split alone, in memory, at the serving transform (the demo's and export's evaluation set)."""
    src = open_source(data, report=False)
    return materialise(src, split_indices(len(src), holdout, seed)[1], size)


def load_digits(size: int, holdout: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    return load_dataset(DIGITS, size, holdout, seed)


def write_images(split: Split, out: Path) -> int:
    """Write a split as PNG files under out/<class>/ (the demo's held-out images); returns the count."""
    out = Path(out)
    for i, (img, label) in enumerate(zip(split.images, split.labels, strict=True)):
        d = out / split.classes[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return len(split.labels)
