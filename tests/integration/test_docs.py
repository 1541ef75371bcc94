"""What README.md tells a new user, checked: the Makefile variables it lists, the venv activation, the torchvision
weight conversion recipe for --init, and rolling back to an older model version."""

from __future__ import annotations

import re
import shutil
import sys
import types
from pathlib import Path

import grpc
import numpy as np
import pytest

from resnet_serve.protos import classifier_pb2 as pb
from resnet_serve.protos import classifier_pb2_grpc as pb_grpc
from tests.harness import InProcessServer, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_documents_every_makefile_variable_with_its_default() -> None:
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+) \?= (.*)$", makefile, re.M))
    assert {"NAME", "DATA", "CHECKPOINTS", "MODELS", "PORT", "METRICS_PORT"} <= set(variables)
    for name, default in variables.items():
        row = re.search(rf"^\| `{name}` \| `([^`]*)`", README, re.M)
        assert row, f"README's Makefile table lacks {name}"
        if not default.startswith("$(if"):  # a computed default (NAME) is described in words
            assert row.group(1) == default, (name, row.group(1), default)
    assert "--data $(DATA)" in makefile  # DATA reaches make train


def test_readme_says_how_to_get_the_commands_on_path() -> None:
    assert "source .venv/bin/activate" in README and ".venv/bin/resnet-train" in README


def test_readme_torchvision_conversion_gives_weights_init_copies(tmp_path: Path, monkeypatch) -> None:
    """The README's recipe, run on a torchvision-layout state dict (made from a Paddle model, so the expected
    weights are known; `torch` itself is stood in for: only its load() is used)."""
    import paddle
    from paddle.vision.models import resnet18

    from resnet_serve.train.models import init_from

    class TorchTensor(np.ndarray):
        def numpy(self) -> np.ndarray:
            return np.asarray(self)

    paddle.seed(3)
    source = {k: v.numpy() for k, v in resnet18(num_classes=1000).state_dict().items()}
    torch_layout = {}
    for k, v in source.items():
        k = k.replace("_mean", "running_mean").replace("_variance", "running_var")
        torch_layout[k] = (v.T if k == "fc.weight" else v).view(TorchTensor)
        if k.endswith("running_var"):
            torch_layout[k.replace("running_var", "num_batches_tracked")] = np.array(7).view(TorchTensor)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=lambda path, map_location: torch_layout))
    monkeypatch.chdir(tmp_path)
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "torch.load" in block]
    exec(compile(snippet, "README.md", "exec"), {})
    model = resnet18(num_classes=1000)
    assert init_from(model, tmp_path / "resnet50_imagenet.pdparams") == []  # every tensor copied
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), source[k], err_msg=k)


@pytest.fixture
def two_versions(tmp_path: Path) -> Path:
    models = tmp_path / "tiny"
    make_tiny_model_dir(models, version=1, seed=0)
    make_tiny_model_dir(models, version=2, seed=1)
    return models


def test_rolling_back_as_the_readme_says(two_versions: Path, tmp_path: Path) -> None:
    """Admin/ReloadModel with an older version switches to it (answers and metrics say so); SIGHUP's check then
    moves forward to the highest again, unless the bad version's folder was renamed, as the README says."""
    (tmp_path / "tokens").write_text("t0ken\n")
    srv = InProcessServer(model_dir=str(two_versions), auth_token_file=str(tmp_path / "tokens"), max_batch_size=2)
    auth = (("authorization", "Bearer t0ken"),)
    try:
        image = pb.ClassifyRequest(tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=[32, 32, 3], data=bytes(3072)))
        assert srv.stub.Classify(image, metadata=auth, timeout=30).model_version == "2"
        admin = pb_grpc.AdminStub(srv.channel)
        r = admin.ReloadModel(pb.ReloadModelRequest(version=1), metadata=auth, timeout=300)
        assert (r.version, r.changed) == ("1", True)
        assert srv.stub.Classify(image, metadata=auth, timeout=30).model_version == "1"
        ok = ("resnet_serve_requests_total", (("code", "OK"), ("method", "Classify"), ("model", "tiny")))
        m = srv.metrics()
        assert m[(ok[0], (*ok[1], ("version", "1")))] == 1 and m[(ok[0], (*ok[1], ("version", "2")))] == 1
        shutil.move(two_versions / "2", two_versions / "2.bad")
        srv.call(srv.server.check_for_new_version(), timeout=300)  # what SIGHUP runs
        assert srv.server.model.version == "1"
        shutil.move(two_versions / "2.bad", two_versions / "2")
        srv.call(srv.server.check_for_new_version(), timeout=300)
        assert srv.server.model.version == "2"
        with pytest.raises(grpc.RpcError) as e:
            admin.ReloadModel(pb.ReloadModelRequest(version=1), timeout=30)  # no token
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.close()
