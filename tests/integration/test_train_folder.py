"""The image-folder data set end to end: ImageFolder's rules (hidden and empty folders, skipped files listed once,
per-class counts), every format training reads decoded like the server decodes it, training through DataLoader
worker processes."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_serve.common.imaging import decode_file
from resnet_serve.server.preprocess import Preprocessor
from resnet_serve.train.data import scan_folder
from tests.harness import run_cli

SIZE = 16
ORIENTATION = 0x0112


def _pattern(w: int, h: int) -> np.ndarray:
    """An asymmetric RGB gradient: any rotation or flip changes it."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1).astype(np.uint8)


def _exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A 40x24 landscape JPEG whose EXIF says 'rotate 90 clockwise to display'; returns the stored pixels."""
    img = Image.fromarray(_pattern(40, 24))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    img.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as stored:
        return np.asarray(stored.convert("RGB"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "pets"
    cat, dog = root / "cat", root / "dog"
    for d in (cat, dog, root / "empty", root / ".ipynb_checkpoints", cat / ".cache"):
        d.mkdir(parents=True)
    Image.fromarray(_pattern(30, 20)).save(cat / "a_plain.jpg", quality=95)
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (10, 200, 30, 255)  # left half opaque green, right half transparent black
    Image.fromarray(rgba, "RGBA").save(cat / "b_alpha.png")
    grey16 = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 65535 // (24 * 24 - 1)).astype(np.uint16)
    Image.fromarray(grey16).save(cat / "c_grey16.png")
    _exif_rotated_jpeg(cat / "d_rotated.jpg")
    (cat / "notes.txt").write_text("not an image")
    Image.fromarray(_pattern(20, 20)).save(cat / ".cache" / "thumb.jpg")
    Image.fromarray(_pattern(20, 20)).save(root / ".ipynb_checkpoints" / "x.jpg")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(dog / "e_cmyk.jpg", quality=95)
    gif = Image.new("P", (20, 20), 0)
    gif.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    gif.paste(1, (0, 0, 10, 20))  # left half blue, right half palette entry 0: transparent
    gif.save(dog / "f_palette.gif", transparency=0)
    Image.fromarray(_pattern(20, 30)).save(dog / "g_plain.png")
    Image.fromarray(_pattern(20, 30)[::-1].copy()).save(dog / "h_plain.webp")
    return root


EXPECTED_SKIPPED = {(".ipynb_checkpoints", "hidden"), ("cat/.cache", "hidden"),
                    ("cat/notes.txt", "not an image (.txt)"), ("empty", "empty class folder")}


def test_scan_follows_image_folder_rules(image_folder: Path) -> None:
    src = scan_folder(image_folder)
    assert src.classes == ["cat", "dog"]
    assert src.counts() == {"cat": 4, "dog": 4}
    assert [Path(p).name for p in src.paths] == ["a_plain.jpg", "b_alpha.png", "c_grey16.png", "d_rotated.jpg",
                                                 "e_cmyk.jpg", "f_palette.gif", "g_plain.png", "h_plain.webp"]
    assert set(src.skipped) == EXPECTED_SKIPPED and len(src.skipped) == len(EXPECTED_SKIPPED)


def test_training_on_the_folder_end_to_end(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    r = run_cli("resnet-train", "--data", str(image_folder), "--epochs", "1", "--batch-size", "3", "--holdout",
                "0.25", "--num-workers", "2", "--input-size", str(SIZE), "--out", str(out), "--amp", "O0")
    assert r.returncode == 0, r.stderr
    skipped = re.findall(r"WARNING \S+: skipped (\S+) \((.*)\)$", r.stderr, re.M)
    assert sorted(skipped) == sorted(EXPECTED_SKIPPED)  # each listed exactly once
    assert len(re.findall(r"classes \(8 images\): cat 4, dog 4$", r.stderr, re.M)) == 1
    meta = json.loads((out / "epoch_001.json").read_text())
    assert meta["labels"] == ["cat", "dog"] and meta["num_classes"] == 2
    assert meta["dataset"] == str(image_folder.resolve()) and meta["augment"] == {"crop_scale": 0.08, "flip": True}


def test_training_and_serving_decode_to_the_same_pixels(image_folder: Path) -> None:
    """Evaluation uses exactly the serving transform: the same uint8 pixels for every file, through the server's
    Preprocessor fed the file's bytes."""
    src = scan_folder(image_folder)
    serve = Preprocessor((SIZE, SIZE))
    for i, path in enumerate(src.paths):
        served = serve.encoded(Path(path).read_bytes())
        np.testing.assert_array_equal(src.pixels(i, SIZE), served, err_msg=path)


def test_exif_orientation_is_applied(image_folder: Path, tmp_path: Path) -> None:
    stored = _exif_rotated_jpeg(tmp_path / "r.jpg")
    upright = np.asarray(decode_file(image_folder / "cat" / "d_rotated.jpg"))
    assert upright.shape == (40, 24, 3)  # portrait, as displayed
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))
    # and the server, given the bytes at the file's own size, returns the same upright pixels
    np.testing.assert_array_equal(Preprocessor((40, 24)).encoded((tmp_path / "r.jpg").read_bytes()), upright)


def test_sixteen_bit_grey_is_scaled_not_white(image_folder: Path) -> None:
    path = image_folder / "cat" / "c_grey16.png"
    with Image.open(path) as im:
        raw = np.asarray(im).astype(np.float64)
    expected = np.rint(raw / 257).astype(np.uint8)
    decoded = np.asarray(decode_file(path))
    assert decoded.shape == (24, 24, 3) and decoded.min() == 0 and decoded.max() == 255
    for c in range(3):
        np.testing.assert_array_equal(decoded[..., c], expected)
    np.testing.assert_array_equal(Preprocessor((24, 24)).encoded(path.read_bytes()), decoded)


def test_alpha_palette_and_cmyk_are_converted(image_folder: Path) -> None:
    alpha = np.asarray(decode_file(image_folder / "cat" / "b_alpha.png"))
    assert (alpha[:, :10] == (10, 200, 30)).all() and (alpha[:, 10:] == 255).all()  # transparent -> white
    cmyk = np.asarray(decode_file(image_folder / "dog" / "e_cmyk.jpg")).astype(int)
    assert (np.abs(cmyk - (255, 0, 0)) <= 8).all()  # pure red, not inverted
    gif = np.asarray(decode_file(image_folder / "dog" / "f_palette.gif")).astype(int)
    assert (gif[:, :10] == (0, 0, 255)).all() and (gif[:, 10:] == 255).all()  # transparent entry -> white


def test_server_accepts_what_training_reads(image_folder: Path) -> None:
    bmp = io.BytesIO()
    Image.fromarray(_pattern(20, 20)).save(bmp, "BMP")
    serve = Preprocessor((SIZE, SIZE))
    assert serve.encoded(bmp.getvalue()).shape == (SIZE, SIZE, 3)
    for path in scan_folder(image_folder).paths:
        assert serve.encoded(Path(path).read_bytes()).shape == (SIZE, SIZE, 3)


def test_one_class_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data" / "only").mkdir(parents=True)
    (tmp_path / "data" / "empty").mkdir()
    Image.fromarray(_pattern(20, 20)).save(tmp_path / "data" / "only" / "a.png")
    r = run_cli("resnet-train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: dataset folder {tmp_path / 'data'} has a single class (only): a classifier needs at least 2 "
        "class subfolders with images"]


def test_resume_refuses_a_folder_whose_classes_changed(image_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "pets"
    shutil.copytree(image_folder, data)
    out = tmp_path / "ck"
    r = run_cli("resnet-train", "--data", str(data), "--epochs", "1", "--batch-size", "3", "--holdout", "0.25",
                "--num-workers", "0", "--input-size", str(SIZE), "--out", str(out), "--amp", "O0")
    assert r.returncode == 0, r.stderr
    shutil.copy(data / "cat" / "a_plain.jpg", data / "empty" / "now_a_class.jpg")
    r = run_cli("resnet-train", "--resume", str(out), "--epochs", "2")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: the classes of {data} (cat, dog, empty) are no longer the resumed run's (cat, dog): the data set "
        "changed since the run began"]


def test_a_real_server_sees_the_training_pixels(image_folder: Path, tiny_model_dir: Path) -> None:
    """Each image sent as file bytes to a real server scores exactly as the training evaluation's pixels for it
    (sent as a model-sized uint8 tensor, which the server passes through untouched)."""
    from resnet_serve.protos import classifier_pb2 as pb
    from tests.harness import InProcessServer

    size = 32  # the tiny model's input
    src = scan_folder(image_folder)
    srv = InProcessServer(model_dir=str(tiny_model_dir), max_batch_size=1, threads_per_instance=1)
    try:
        def scores(request: pb.ClassifyRequest) -> np.ndarray:
            response = srv.stub.Classify(request, timeout=60)
            return np.array(sorted((p.class_id, p.score) for p in response.predictions))[:, 1]

        def as_tensor(pixels: np.ndarray) -> pb.ClassifyRequest:
            return pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[size, size, 3],
                                                       data=pixels.tobytes()), top_k=10)

        for i, path in enumerate(src.paths):
            served = scores(pb.ClassifyRequest(encoded=Path(path).read_bytes(), top_k=10))
            np.testing.assert_allclose(served, scores(as_tensor(src.pixels(i, size))), rtol=0, atol=1e-6,
                                       err_msg=path)
        # the control: ignoring the EXIF orientation would have scored differently
        rotated = src.paths.index(str(image_folder / "cat" / "d_rotated.jpg"))
        with Image.open(src.paths[rotated]) as stored:
            sideways = np.asarray(stored.convert("RGB").resize((size, size), Image.BILINEAR))
        assert np.abs(scores(as_tensor(sideways)) - scores(as_tensor(src.pixels(rotated, size)))).max() > 1e-5
    finally:
        srv.close()


def test_a_symlink_loop_is_walked_once(image_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "pets"
    shutil.copytree(image_folder, data)
    (data / "cat" / "again").symlink_to(data / "cat", target_is_directory=True)
    src = scan_folder(data)
    assert src.counts() == {"cat": 4, "dog": 4} and ("cat/again", "symlink loop") in src.skipped
