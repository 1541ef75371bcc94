"""Training data is streamed: one epoch through the training DataLoader (worker processes decoding and augmenting
224x224 JPEGs from disk) holds the same peak memory for 2,000 images as for 200.

The pass is the data side of an epoch alone (the DataLoader and dataset that train() builds, no model): the model's
memory does not depend on the number of images, and a ResNet step at 224x224 on this CI machine's 2 shared cores
would make one epoch over 2,000 images take many minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

LIMIT_MB = 150
PASS = """
import json, resource, sys
from resnet_serve.train.cli import FOLDER_AUGMENT
from resnet_serve.train.data import open_source, split_indices
from resnet_serve.train.trainer import ImageDataset, Indices, loader
from resnet_serve.common.imaging import IMAGENET_MEAN, IMAGENET_STD

src = open_source(sys.argv[1], report=False)
train_idx, _ = split_indices(len(src), 0.2, 0)
data = ImageDataset(src, 224, IMAGENET_MEAN, IMAGENET_STD, FOLDER_AUGMENT, 0)
order = Indices(train_idx, 0, shuffle=True)
data.epoch = order.epoch = 1
seen = 0
for x, y in loader(data, order, 32, True, 2):
    seen += int(x.shape[0])
    del x, y
kb = lambda who: resource.getrusage(who).ru_maxrss
print(json.dumps({"images": seen, "main_mb": kb(resource.RUSAGE_SELF) / 1024,
                  "worker_mb": kb(resource.RUSAGE_CHILDREN) / 1024}))
"""


def _jpegs(root: Path, n: int) -> Path:
    """n 224x224 JPEGs in two classes (twenty distinct photos-like images, their bytes repeated)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224]
    blobs = []
    for _ in range(20):
        f = rng.uniform(0.01, 0.1, 3)
        img = np.stack([127 + 100 * np.sin(f[c] * (x + y * c) + c) for c in range(3)], -1)
        img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        path = root / "blob.jpg"
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        blobs.append(path.read_bytes())
        path.unlink()
    for c in ("a", "b"):
        (root / c).mkdir()
    for i in range(n):
        (root / ("a", "b")[i % 2] / f"{i:05d}.jpg").write_bytes(blobs[i % len(blobs)])
    return root


def _peak(folder: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PASS, str(folder)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_the_number_of_images(tmp_path: Path) -> None:
    small, large = _peak(_jpegs(tmp_path / "small", 200)), _peak(_jpegs(tmp_path / "large", 2000))
    print(f"peak RSS 200 images: {small}; 2000 images: {large}")
    assert small["images"] == 160 and large["images"] == 1600
    assert large["main_mb"] - small["main_mb"] < LIMIT_MB, (small, large)
    assert large["worker_mb"] - small["worker_mb"] < LIMIT_MB, (small, large)
