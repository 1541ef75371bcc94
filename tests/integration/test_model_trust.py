"""Model folders are trusted only as far as their own files: every name a manifest gives stays inside its version
folder, every file matches the sha256 the manifest lists, and the hot-reload poller survives what operators and
copies leave lying around (a version seen mid-copy, a folder named '²'). Real server, real reloads; the poller is
observed through the version it serves, never through timing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from resnet_serve.common.modeldir import MANIFEST, ModelDirError, list_versions, load_manifest, read_labels
from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from tests.harness import InProcessServer, wait_for

TOKEN = "trust-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def copy_version(src: Path, dst: Path, version: int | None = None, **manifest_changes) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / MANIFEST).read_text())
    data.update(manifest_changes, **({"version": version} if version is not None else {}))
    (dst / MANIFEST).write_text(json.dumps(data))
    return dst


# --- names and checksums -------------------------------------------------------------------------------------
@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the model with files a manifest must never reach."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "labels.txt").write_text("secret line\n" * 10)
    return d


@pytest.mark.parametrize("change", ["absolute labels_file", "params_file up and out", "params symlinked out",
                                    "files entry up and out", "model_file is the folder"])
def test_a_manifest_name_leading_outside_its_folder_is_refused(tiny_model_dir: Path, tmp_path: Path,
                                                              outside: Path, change: str) -> None:
    vdir = tmp_path / "m" / "1"
    copy_version(tiny_model_dir / "1", vdir)
    shutil.copy(vdir / "inference.pdiparams", outside / "params")
    data = json.loads((vdir / MANIFEST).read_text())
    if change == "absolute labels_file":
        data["labels_file"] = str(outside / "labels.txt")
    elif change == "params_file up and out":
        data["params_file"] = "../../outside/params"
    elif change == "params symlinked out":
        (vdir / "inference.pdiparams").unlink()
        (vdir / "inference.pdiparams").symlink_to(outside / "params")
    elif change == "files entry up and out":
        data["files"]["../../outside/labels.txt"] = "0" * 64
    else:
        data["model_file"] = "."
    (vdir / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ModelDirError, match="outside its version folder|relative to its version folder"):
        load_manifest(vdir)
    with pytest.raises(ModelDirError):
        load_manifest(vdir, verify_checksums=True)


def test_labels_are_read_only_from_inside_the_folder(tiny_model_dir: Path, outside: Path) -> None:
    manifest = load_manifest(tiny_model_dir / "1", verify_checksums=True)
    assert read_labels(tiny_model_dir / "1", manifest)[0] == "digit_0"
    manifest.labels_file = str(outside / "labels.txt")
    with pytest.raises(ModelDirError):
        read_labels(tiny_model_dir / "1", manifest)


def test_a_symlink_that_stays_inside_the_folder_is_fine(tiny_model_dir: Path, tmp_path: Path) -> None:
    vdir = copy_version(tiny_model_dir / "1", tmp_path / "m" / "1")
    (vdir / "weights").mkdir()
    (vdir / "inference.pdiparams").rename(vdir / "weights" / "inference.pdiparams")
    (vdir / "inference.pdiparams").symlink_to(Path("weights") / "inference.pdiparams")
    assert load_manifest(vdir, verify_checksums=True).params_file == "inference.pdiparams"


@pytest.mark.parametrize("tamper", ["labels edited", "params edited", "labels not listed"])
def test_checksums_are_verified(tiny_model_dir: Path, tmp_path: Path, tamper: str) -> None:
    vdir = copy_version(tiny_model_dir / "1", tmp_path / "m" / "1")
    load_manifest(vdir, verify_checksums=True)
    if tamper == "labels edited":
        (vdir / "labels.txt").write_text("cat\n" * 10)
        match = "checksum mismatch for .*labels.txt"
    elif tamper == "params edited":
        with open(vdir / "inference.pdiparams", "r+b") as f:
            f.seek(100)
            f.write(b"\x00\x01\x02\x03")
        match = "checksum mismatch for .*inference.pdiparams"
    else:
        data = json.loads((vdir / MANIFEST).read_text())
        del data["files"]["labels.txt"]
        (vdir / MANIFEST).write_text(json.dumps(data))
        match = "lists no sha256 for labels.txt"
    with pytest.raises(ModelDirError, match=match):
        load_manifest(vdir, verify_checksums=True)


def test_only_ascii_digit_folders_are_versions(tmp_path: Path) -> None:
    for name in ("1", "2", "²", "٣", "007", "0", "x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST).write_text("{}")
    assert list_versions(tmp_path) == [1, 2]


# --- the poller on a real server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust") / "tiny"
    copy_version(tiny_model_dir / "1", root / "1")
    return root


@pytest.fixture(scope="module")
def srv(models: Path, tmp_path_factory: pytest.TempPathFactory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(TOKEN + "\n")
    s = InProcessServer(model_dir=str(models), threads_per_instance=1, max_batch_size=1, poll_interval_s=0.05,
                        auth_token_file=str(tokens))
    yield s
    s.close()


def served(srv: InProcessServer) -> str:
    return srv.server.model.version


def classify(srv: InProcessServer) -> pb.ClassifyResponse:
    arr = np.zeros((32, 32, 3), np.uint8)
    return srv.stub.Classify(pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[32, 32, 3],
                                                                 data=arr.tobytes())), metadata=AUTH, timeout=60)


def test_a_tampered_version_is_refused_and_the_old_one_keeps_serving(srv: InProcessServer, models: Path) -> None:
    assert served(srv) == "1"
    v2 = copy_version(models / "1", models / ".2.tmp", version=2)
    (v2 / "labels.txt").write_text("tampered\n" * 10)
    v2.rename(models / "2")
    wait_for(lambda: models / "2" in srv.server.refused_versions, what="the poller to refuse version 2")
    assert served(srv) == "1"
    assert all(p.label.startswith("digit_") for p in classify(srv).predictions)


def test_a_version_seen_mid_copy_is_loaded_once_the_copy_completes(srv: InProcessServer, models: Path) -> None:
    """Copied in place, manifest first and parameters last (as `cp -r` may): refused while incomplete, then
    retried because one of its files changed, though the manifest did not."""
    v3 = models / "3"
    v3.mkdir()
    for f in (models / "1").iterdir():
        if f.name != "inference.pdiparams":
            shutil.copy(f, v3 / f.name)
    data = json.loads((v3 / MANIFEST).read_text())
    (v3 / MANIFEST).write_text(json.dumps({**data, "version": 3}))
    params = (models / "1" / "inference.pdiparams").read_bytes()
    (v3 / "inference.pdiparams").write_bytes(params[: len(params) // 2])
    wait_for(lambda: v3 in srv.server.refused_versions, what="the poller to refuse the half-copied version 3")
    assert served(srv) == "1"
    with open(v3 / "inference.pdiparams", "ab") as f:
        f.write(params[len(params) // 2:])
    wait_for(lambda: served(srv) == "3", timeout=120, what="version 3 once its copy completed")
    assert classify(srv).model_version == "3"


def test_a_unicode_digit_folder_does_not_stop_the_poller(srv: InProcessServer, models: Path) -> None:
    stray = models / "²"
    copy_version(models / "1", stray)
    copy_version(models / "1", models / ".4.tmp", version=4).rename(models / "4")
    wait_for(lambda: served(srv) == "4", timeout=120, what="the poller to find version 4 beside '²'")
    # Admin ReloadModel and the SIGHUP path answer properly with the stray folder present.
    r = pb_grpc.AdminStub(srv.channel).ReloadModel(pb.ReloadModelRequest(), metadata=AUTH, timeout=60)
    assert (r.version, r.changed) == ("4", False) and "already serving" in r.message
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.AdminStub(srv.channel).ReloadModel(pb.ReloadModelRequest(version=2), metadata=AUTH, timeout=300)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "checksum mismatch" in err.value.details()
    srv.call(srv.server.check_for_new_version(retry_refused=True))
    assert served(srv) == "4"


def test_a_failing_poll_is_logged_and_the_next_one_runs(srv: InProcessServer, models: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """One poll fails in a way nobody planned for (here: listing the folder raises); the poller logs it and the
    next poll still finds the new version."""
    import resnet_serve.server.app as app

    failures = []

    def list_once_broken(model_dir):
        if not failures:
            failures.append(model_dir)
            raise RuntimeError("listing failed")
        return list_versions(model_dir)

    monkeypatch.setattr(app, "list_versions", list_once_broken)
    wait_for(lambda: failures, what="a failed poll")
    copy_version(models / "1", models / ".5.tmp", version=5).rename(models / "5")
    wait_for(lambda: served(srv) == "5", timeout=120, what="the next polls to find version 5")
    assert any("looking for a new model version failed" in r.getMessage() for r in caplog.records)


def test_sighup_loads_a_new_version_beside_a_unicode_digit_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`resnet-serve` as users run it: with a stray '²' folder and a version refused mid-copy, SIGHUP still loads
    the next complete version (it used to die on int('²'))."""
    import signal

    from tests.harness import start_subprocess_server

    models = tmp_path / "tiny"
    copy_version(tiny_model_dir / "1", models / "1")
    copy_version(tiny_model_dir / "1", models / "²")
    proc, ports = start_subprocess_server("--model-dir", str(models), "--threads-per-instance", "1",
                                          "--max-batch-size", "1", "--metrics-port", "-1")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['port']}")
        stub = pb_grpc.ClassifierStub(channel)

        def version() -> str:
            try:
                return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version
            except grpc.RpcError:
                return ""

        wait_for(lambda: version() == "1", timeout=300, what="version 1 served")
        copy_version(models / "1", models / ".2.tmp", version=2).rename(models / "2")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: version() == "2", timeout=120, what="SIGHUP to load version 2")
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "Task exception was never retrieved" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
