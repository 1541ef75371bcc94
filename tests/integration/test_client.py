"""The sync and async clients and `resnet-client` against a real server on the tiny model: identical results
for every input kind, the stream window held, unary retries across a server start, errors with their gRPC codes,
the CLI's commands and exit codes, and bench request counts against the server's own counters."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from resnet_serve.client.aio import AsyncClassifierClient
from resnet_serve.client.retry import Attempts
from resnet_serve.client.sync import (
    ChannelOptions,
    ClassifierClient,
    ClassifierError,
    Result,
    RetryPolicy,
    target_string,
)
from resnet_serve.client.tools import cli
from resnet_serve.client.tools.cli import info_dict
from tests.harness import InProcessServer, run_cli

SIZE = 32
FAST_FAIL = RetryPolicy(attempts=2, initial_backoff_s=0.01)


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path):
    s = InProcessServer(model_dir=str(tiny_model_dir), max_batch_size=8, max_queue_delay_us=1000,
                        threads_per_instance=1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(srv):
    with ClassifierClient(srv.address) as c:
        yield c


def aio(address: str, fn: Callable, **kwargs):
    """Run fn(async_client) to completion in a fresh event loop (grpc.aio channels belong to one loop)."""
    async def main():
        async with AsyncClassifierClient(address, **kwargs) as c:
            return await fn(c)

    return asyncio.run(main())


def picture(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLOSED = f"127.0.0.1:{free_port()}"  # nothing listens here


def assert_same(a: list, b: list) -> None:
    """Same classes and labels in the same order; scores equal up to float noise between batch compositions."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y)
        if isinstance(x, ClassifierError):
            assert (x.code, x.message) == (y.code, y.message)
            continue
        assert [(p.class_id, p.label) for p in x.predictions] == [(p.class_id, p.label) for p in y.predictions]
        np.testing.assert_allclose([p.score for p in x.predictions], [p.score for p in y.predictions], atol=1e-5)
        assert x.model_version == y.model_version == "1"


# --- results -------------------------------------------------------------------------------------------------
INPUT_KINDS = ["path", "bytes", "pil", "uint8", "float32"]


def make_input(kind: str, tmp_path: Path, seed: int = 7):
    arr = picture(seed, 40, 48)
    if kind == "path":
        (tmp_path / "x.png").write_bytes(png(arr))
        return tmp_path / "x.png"
    if kind == "bytes":
        return png(arr)
    if kind == "pil":
        return Image.fromarray(arr)
    if kind == "uint8":
        return arr
    return np.random.default_rng(seed).standard_normal((3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_sync_and_async_clients_give_identical_results(srv, client, tmp_path, kind: str) -> None:
    image = make_input(kind, tmp_path)
    sync_one = client.classify(image, top_k=3)
    sync_many = client.classify_many([image, image], top_k=3, window=1)

    async def both(c: AsyncClassifierClient):
        return await c.classify(image, top_k=3), await c.classify_many([image, image], top_k=3, window=1)

    async_one, async_many = aio(srv.address, both)
    assert len(sync_one.predictions) == 3
    assert_same([sync_one, *sync_many], [async_one, *async_many])
    assert_same([sync_one], [sync_many[0]])


def test_model_info_preprocessing_reproduces_the_servers(client) -> None:
    """A client that follows GetModelInfo's preprocessing and sends FLOAT32 gets what sending the PNG gets."""
    info = client.model_info()
    p = info.preprocessing
    assert list(info.labels) == [f"digit_{i}" for i in range(10)] and "centre crop" in p.resize
    arr = picture(5, 45, 60)
    h, w = p.input_size
    img = Image.fromarray(arr)
    scale = max(h / img.height, w / img.width)
    box_w, box_h = w / scale, h / scale
    left, top = (img.width - box_w) / 2, (img.height - box_h) / 2
    img = img.resize((w, h), Image.BILINEAR, box=(left, top, left + box_w, top + box_h))
    x = (np.asarray(img, np.float32) * p.scale - np.float32(p.mean)) / np.float32(p.std)
    mine = client.classify(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32), top_k=10)
    assert_same([client.classify(png(arr), top_k=10)], [mine])


def test_path_bytes_and_pil_of_one_picture_agree(client, tmp_path) -> None:
    results = [client.classify(make_input(kind, tmp_path)) for kind in ("path", "bytes", "pil")]
    assert_same(results[:1] * 3, results)


def test_top_k_one_rule_default_and_explicit_capped_at_the_class_count(client) -> None:
    """10 classes: the default is 5, any k above 10 (the default's rule) returns all 10 rather than an error."""
    assert len(client.classify(picture(1)).predictions) == 5
    assert len(client.classify(picture(1), top_k=3).predictions) == 3
    for k in (10, 11, 1000):
        assert len(client.classify(picture(1), top_k=k).predictions) == 10


def test_unordered_stream_answers_each_item_once(srv, client) -> None:
    images = [picture(i) for i in range(20)]
    got = {r.request_id: r for r in client.stream(images, window=5)}

    async def collect(c):
        return {r.request_id: r async for r in c.stream(images, window=5)}

    got_async = aio(srv.address, collect)
    assert set(got) == set(got_async) == {str(i) for i in range(20)}
    assert_same([got[str(i)] for i in range(20)], [got_async[str(i)] for i in range(20)])


def test_stream_ids_are_the_callers_paths_by_default(srv, client, tmp_path) -> None:
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(png(picture(i)))
    assert sorted(r.request_id for r in client.stream(paths, window=2)) == sorted(map(str, paths))
    ids = [f"photo-{i}" for i in range(6)]
    assert [r.request_id for r in client.classify_many(paths, ids=ids)] == ids
    arrays = [picture(i) for i in range(3)]
    bad = [picture(0), b"not an image", picture(1)]

    async def collect(c):
        got = [r.request_id async for r in c.stream(paths, window=2)]
        named = [r.request_id for r in await c.classify_many(arrays, ids=["a", "a", "b"])]  # duplicates are fine
        return got, named, await c.classify_many(bad, ids=["x", "y", "z"])

    got, named, mixed = aio(srv.address, collect)
    assert sorted(got) == sorted(map(str, paths)) and named == ["a", "a", "b"]
    assert [type(r) for r in mixed] == [Result, ClassifierError, Result]
    assert [r.request_id for r in mixed] == ["x", "y", "z"]  # an item's error carries the caller's id too
    assert [r.request_id for r in client.classify_many(arrays)] == ["0", "1", "2"]  # not files: positions
    with pytest.raises(ValueError, match="fewer request ids"):
        client.classify_many(arrays, ids=["only-one"])


def test_leaving_a_stream_early_cancels_it_and_the_client_goes_on(srv, client) -> None:
    images = [picture(i) for i in range(50)]
    first = next(iter(client.stream(images, window=2)))
    assert isinstance(first, Result) and client.classify(images[0]).predictions

    async def leave_early(c):
        stream = c.stream(images, window=2)
        item = await anext(stream)
        await stream.aclose()
        return item, await c.classify(images[0])

    item, again = aio(srv.address, leave_early)
    assert isinstance(item, Result) and again.predictions


# --- the stream window ---------------------------------------------------------------------------------------
class CohortGate:
    """Wraps the serving handle's submit (what the servicer calls once per stream item): holds items until `size`
    of them are held, then lets them all go.
    So the server sees a full window at once (max_in_flight reaches the window), and an item sent beyond the
    window would be read while the cohort is held or computing and show as more than `size` in flight."""

    def __init__(self, inner, size: int):
        self.inner, self.size = inner, size
        self.in_flight = self.max_in_flight = 0
        self.held: list[asyncio.Future] = []

    async def __call__(self, images, top_k, deadline):
        self.in_flight += 1  # the server's event loop only: no lock needed
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fut = asyncio.get_running_loop().create_future()
            self.held.append(fut)
            if len(self.held) == self.size:
                for f in self.held:
                    f.set_result(None)
                self.held = []
            await fut
            return await self.inner(images, top_k, deadline)
        finally:
            self.in_flight -= 1  # before the answer is even queued for sending


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_stream_window_is_never_exceeded(srv, client, monkeypatch, flavour: str) -> None:
    window, n = 4, 24  # n a multiple of the window, so every cohort fills
    gate = CohortGate(srv.server.handle.submit, window)
    monkeypatch.setattr(srv.server.handle, "submit", gate)
    images = [picture(i) for i in range(n)]
    if flavour == "sync":
        results = client.classify_many(images, window=window, timeout=120)
    else:
        async def agen():  # an async iterable of images works as well
            for image in images:
                yield image

        results = aio(srv.address, lambda c: c.classify_many(agen(), window=window, timeout=120))
    assert [r.request_id for r in results] == [str(i) for i in range(n)]
    assert all(isinstance(r, Result) for r in results)
    assert gate.max_in_flight == window


# --- retries -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SignallingRetry(RetryPolicy):
    """Sets `failed_once` when the first attempt has failed with a retryable code (i.e. a retry is coming)."""

    failed_once: threading.Event = field(default_factory=threading.Event, compare=False)

    def backoffs(self):
        for delay in super().backoffs():
            self.failed_once.set()
            yield delay


def test_unary_call_started_before_the_server_succeeds_by_retrying(tiny_model_dir: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    policy = dict(attempts=100_000, initial_backoff_s=0.02, max_backoff_s=0.1)
    sync_retry, async_retry = SignallingRetry(**policy), SignallingRetry(**policy)
    image = picture(3)
    with ThreadPoolExecutor(2) as pool, ClassifierClient(address, retry=sync_retry, timeout=240) as c:
        sync_call = pool.submit(c.classify, image)
        async_call = pool.submit(aio, address, lambda ac: ac.classify(image), retry=async_retry, timeout=240)
        assert sync_retry.failed_once.wait(60) and async_retry.failed_once.wait(60)
        assert not sync_call.done() and not async_call.done()
        server = InProcessServer(model_dir=str(tiny_model_dir), port=port, threads_per_instance=1)
        try:
            assert_same([sync_call.result(240)], [async_call.result(240)])
        finally:
            server.close()


# --- errors --------------------------------------------------------------------------------------------------
def both_raise(address: str, call: Callable, acall: Callable, **kwargs) -> tuple[ClassifierError, ClassifierError]:
    """The same failing call through the sync and the async client; both errors."""
    with ClassifierClient(address, **kwargs) as c, pytest.raises(ClassifierError) as e1:
        call(c)

    async def run(ac):
        with pytest.raises(ClassifierError) as e:
            await acall(ac)
        return e.value

    return e1.value, aio(address, run, **kwargs)


def test_invalid_input_is_invalid_argument(srv) -> None:
    for make in (lambda c: c.classify(b"not an image"), lambda c: c.classify(np.zeros((3, 8, 8), np.float32))):
        errors = both_raise(srv.address, make, make)
        assert {e.code for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
        assert errors[0].message == errors[1].message and errors[0].message


def test_bad_stream_item_is_an_error_in_its_place(srv, client) -> None:
    images = [picture(1), b"garbage", picture(2)]
    results = client.classify_many(images)
    assert_same(results, aio(srv.address, lambda c: c.classify_many(images)))
    assert isinstance(results[1], ClassifierError) and results[1].request_id == "1"
    assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(results[0], Result) and isinstance(results[2], Result)


def test_unsendable_image_raises_its_own_error(srv, client) -> None:
    with pytest.raises(TypeError, match="cannot send int"):
        client.classify_many([picture(1), 5])
    with pytest.raises(ValueError, match="arrays must be"):
        aio(srv.address, lambda c: c.classify_many([np.zeros((4, 4), np.uint8)]))
    assert client.classify(picture(1)).predictions  # the channel is still fine


@pytest.mark.parametrize("what", ["classify", "model_info", "health", "stream"])
def test_closed_port_is_unavailable(what: str) -> None:
    calls = {"classify": lambda c: c.classify(picture(0)), "model_info": lambda c: c.model_info(),
             "health": lambda c: c.health(), "stream": lambda c: c.classify_many([picture(0)])}
    errors = both_raise(CLOSED, calls[what], calls[what], retry=FAST_FAIL)
    assert [e.code for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 2


def test_wait_until_ready_gives_up_with_deadline_exceeded() -> None:
    errors = both_raise(CLOSED, lambda c: c.wait_until_ready(0.2), lambda c: c.wait_until_ready(0.2))
    assert all(e.code == grpc.StatusCode.DEADLINE_EXCEEDED and "UNAVAILABLE" in e.message for e in errors)


def test_ready_server_passes_wait_and_health(srv, client) -> None:
    client.wait_until_ready(30)
    assert client.health() == "SERVING"

    async def check(c):
        await c.wait_until_ready(30)
        return await c.health(), info_dict(await c.model_info())

    assert aio(srv.address, check) == ("SERVING", info_dict(client.model_info()))


# --- options and helpers -------------------------------------------------------------------------------------
def test_target_forms() -> None:
    assert target_string("dns:///example.com:50051") == "dns:///example.com:50051"
    assert target_string("localhost:1") == "localhost:1"
    assert target_string(["localhost:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert target_string("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert target_string(["[::1]:5", "[::2]:6"]) == "ipv6:[::1]:5,[::2]:6"
    with pytest.raises(ValueError, match="mix"):
        target_string(["[::1]:5", "127.0.0.1:6"])
    with pytest.raises(ValueError, match="host:port"):
        target_string("a,b")


def test_channel_options() -> None:
    assert ChannelOptions().credentials() is None
    assert ChannelOptions(tls=True).credentials() is not None  # system roots, not silently plaintext
    with pytest.raises(ValueError, match="both"):
        ChannelOptions(client_certificate=Path("c.pem")).credentials()
    opts = dict(ChannelOptions(server_name="srv.local").grpc_options())
    assert opts["grpc.ssl_target_name_override"] == "srv.local" and opts["grpc.lb_policy_name"] == "round_robin"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_attempts_retry_only_unavailable_within_budget_and_deadline() -> None:
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    a = Attempts(RetryPolicy(attempts=3, initial_backoff_s=0.001), timeout=None)
    assert a.retry_after(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert a.retry_after(unavailable) is not None and a.retry_after(unavailable) is not None
    assert a.retry_after(unavailable) is None  # 3 attempts = 2 retries
    assert Attempts(RetryPolicy(initial_backoff_s=10), timeout=1).retry_after(unavailable) is None  # past deadline
    assert Attempts(RetryPolicy(), timeout=None).remaining() is None


def test_token_flag_and_environment_become_bearer_metadata(monkeypatch) -> None:
    monkeypatch.setenv(cli.TOKEN_ENV, "from-env")
    args = cli.build_parser().parse_args(["info"])
    assert cli.options_from(args).metadata == (("authorization", "Bearer from-env"),)
    args = cli.build_parser().parse_args(["info", "--token", "s3cret"])
    assert cli.options_from(args).metadata == (("authorization", "Bearer s3cret"),)
    monkeypatch.delenv(cli.TOKEN_ENV)
    assert cli.options_from(cli.build_parser().parse_args(["info"])).metadata == ()


# --- the command line ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 class folders named after the model's labels with 4 PNGs each, a BMP, GIF and TIFF in digit_1, one broken
    file, one PNG and one text file at the top."""
    root = tmp_path_factory.mktemp("images")
    for c in range(3):
        (root / f"digit_{c}").mkdir()
        for i in range(4):
            (root / f"digit_{c}" / f"{i}.png").write_bytes(png(picture(10 * c + i)))
    (root / "digit_2" / "broken.JPG").write_bytes(b"not a jpeg")
    for suffix, seed in (("bmp", 40), ("gif", 41), ("tiff", 42)):  # formats the client decodes itself
        Image.fromarray(picture(seed)).save(root / "digit_1" / f"{suffix}.{suffix}")
    (root / "top.png").write_bytes(png(picture(99)))
    (root / "notes.txt").write_text("not an image")
    return root


def test_cli_classify_json_matches_the_library(srv, client, image_dir) -> None:
    files = [image_dir / "digit_0" / "0.png", image_dir / "top.png"]
    r = run_cli("resnet-client", "classify", "--target", srv.address, "--json", "--top-k", "3", *map(str, files))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [d["image"] for d in doc] == list(map(str, files))
    for d, f in zip(doc, files, strict=True):
        want = client.classify(f, top_k=3)
        assert [(p["class_id"], p["label"]) for p in d["predictions"]] == [(p.class_id, p.label)
                                                                           for p in want.predictions]
    table = run_cli("resnet-client", "classify", "--target", srv.address, str(files[0]))
    assert table.returncode == 0 and table.stdout.split()[:4] == ["IMAGE", "CLASS", "LABEL", "SCORE"]


def test_cli_stream_writes_a_line_per_file_names_failures_and_exits_1(srv, client, image_dir) -> None:
    r = run_cli("resnet-client", "stream", str(image_dir), "--target", srv.address, "--json", "--window", "3")
    assert r.returncode == 1, r.stderr  # broken.JPG failed
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    items, summary = lines[:-1], lines[-1]["summary"]
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp", ".gif", ".tiff"))
    assert sorted(i["image"] for i in items) == sorted(map(str, files)) and len(files) == 17
    broken = str(image_dir / "digit_2" / "broken.JPG")
    assert [i["image"] for i in items if "error" in i] == [broken]
    assert summary["failed"] == [broken] and summary["skipped"] == [str(image_dir / "notes.txt")]
    assert summary["images"] == 17 and summary["ok"] == 16 and summary["errors"] == {"INVALID_ARGUMENT": 1}
    assert "it/s" not in r.stderr and "img/s" not in r.stderr  # stderr is a pipe here: no progress bar
    # .bmp and .gif (sent as they are) and .tiff (decoded by the client) give what their pixels give
    for suffix in ("bmp", "gif", "tiff"):
        (item,) = [i for i in items if i["image"].endswith(suffix)]
        pixels = np.asarray(Image.open(item["image"]).convert("RGB"))
        assert item["predictions"][0]["class_id"] == client.classify(pixels).top1.class_id
    labelled = [(f.parent.name, client.classify(cli.load_image(f))) for f in files
                if f.parent != image_dir and str(f) != broken]
    top1 = sum(res.top1.label == label for label, res in labelled)
    acc = summary["accuracy"]
    assert acc["labelled"] == 16 and acc["top1_correct"] == top1  # the broken file counts as a miss
    text = run_cli("resnet-client", "stream", str(image_dir), "--target", srv.address, "--no-progress")
    assert text.returncode == 1 and "images/s" in text.stdout and "/16" in text.stdout
    out = text.stdout.splitlines()
    assert out[0].split() == ["IMAGE", "CLASS", "LABEL", "SCORE"]
    assert sum(line.startswith(str(image_dir)) for line in out) == 17  # a row per file
    assert f"failed (1): {broken}" in text.stdout and "skipped, not images (1)" in text.stdout


def test_cli_stream_draws_progress_only_on_a_terminal(srv, image_dir) -> None:
    """stderr on a pseudo-terminal (80x24): the bar is drawn there, and stdout still gets every row."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    drawn = bytearray()

    def read_all() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "resnet-client"), "stream", str(image_dir),
                               "--target", srv.address], stdout=subprocess.PIPE, stderr=terminal, timeout=120)
    finally:
        os.close(terminal)
        reader.join(30)
        os.close(controller)
    assert proc.returncode == 1 and b"17/17" in drawn and b"img" in drawn
    assert proc.stdout.decode().count(str(image_dir)) >= 17


def test_cli_classify_keeps_going_and_reports_every_file(srv, client, image_dir, tmp_path) -> None:
    good, bmp = image_dir / "digit_0" / "0.png", image_dir / "digit_1" / "bmp.bmp"
    notes, broken = image_dir / "notes.txt", image_dir / "digit_2" / "broken.JPG"
    r = run_cli("resnet-client", "classify", "--target", srv.address, "--json", str(good), str(notes), str(bmp),
                str(broken))
    assert r.returncode == 1  # the server refused two, nothing was unreadable
    doc = json.loads(r.stdout)
    assert [d["image"] for d in doc] == [str(good), str(notes), str(bmp), str(broken)]
    assert ["error" in d for d in doc] == [False, True, False, True]
    assert doc[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert doc[0]["predictions"][0]["class_id"] == client.classify(good).top1.class_id
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("error: INVALID_ARGUMENT: ") for e in errors)
    assert str(notes) in errors[0] and str(broken) in errors[1]
    # a missing file: the others still classified, exit 2 (the user's input), one line for it
    r = run_cli("resnet-client", "classify", "--target", srv.address, str(good), "/no/such.png", str(good))
    assert r.returncode == 2 and r.stderr.strip() == "error: /no/such.png: no such file"
    assert sum(line.startswith(str(good)) for line in r.stdout.splitlines()) == 2


def test_cli_classify_a_directory_classifies_what_is_in_it(srv, image_dir, tmp_path) -> None:
    r = run_cli("resnet-client", "classify", "--target", srv.address, "--json", str(image_dir / "digit_0"))
    assert r.returncode == 0, r.stderr
    assert sorted(d["image"] for d in json.loads(r.stdout)) == sorted(str(p) for p in (image_dir / "digit_0").iterdir())
    (tmp_path / "empty").mkdir()
    r = run_cli("resnet-client", "classify", "--target", srv.address, str(tmp_path / "empty"))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {tmp_path / 'empty'}: a directory with no images")
    assert "no such file" not in r.stderr


def test_cli_info_and_health(srv, client) -> None:
    r = run_cli("resnet-client", "info", "--target", srv.address, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == info_dict(client.model_info())
    assert doc["labels"] == [f"digit_{i}" for i in range(10)]
    pre = doc["preprocessing"]
    assert pre["input_size"] == [SIZE, SIZE] and pre["mean"] == doc["mean"] and pre["std"] == doc["std"]
    assert pre["color"] == "RGB" and pre["layout"] == "NCHW"
    assert pre["formats"] == ["JPEG", "PNG", "WEBP", "GIF", "BMP"]
    text = run_cli("resnet-client", "info", "--target", srv.address)
    assert text.returncode == 0 and "0=digit_0, 1=digit_1" in text.stdout and "centre crop to 32x32" in text.stdout
    h = run_cli("resnet-client", "health", "--target", srv.address, "--wait", "30")
    assert (h.returncode, h.stdout.strip()) == (0, "SERVING")


@pytest.mark.parametrize("argv", [
    ["classify", "/no/such/image.png"],
    ["stream", "/no/such/dir"],
    ["classify", "--top-k", "-1", "x"],
    ["bench", "--concurrency", "0"],
    ["bench", "--rate", "fast"],
    ["info", "--tls-cert", "/etc/hostname"],
    ["info", "--target", "127.0.0.1:1,b"],
    ["bench", "--input-data", "/no/such/dir"],
    ["frobnicate"],
], ids=lambda a: " ".join(a))
def test_cli_bad_input_is_one_line_and_exit_2(argv: list[str]) -> None:
    r = run_cli("resnet-client", *argv)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def test_cli_failed_rpc_is_code_and_exit_1(srv, image_dir) -> None:
    r = run_cli("resnet-client", "info", "--target", CLOSED)
    assert r.returncode == 1 and r.stderr.startswith("error: UNAVAILABLE: ")
    r = run_cli("resnet-client", "classify", "--target", srv.address, str(image_dir / "digit_2" / "broken.JPG"))
    assert r.returncode == 1 and r.stderr.startswith("error: INVALID_ARGUMENT: ") and "broken.JPG" in r.stderr
    r = run_cli("resnet-client", "health", "--target", CLOSED)
    assert r.returncode == 1 and r.stderr.startswith("error: UNAVAILABLE: ")


# --- bench ---------------------------------------------------------------------------------------------------
def requests_total(srv: InProcessServer, method: str) -> float:
    return sum(v for (name, labels), v in srv.metrics().items()
               if name == "resnet_serve_requests_total" and dict(labels).get("method") == method)


@pytest.mark.parametrize("mode,extra", [("unary", ["--concurrency", "1,3"]),
                                        ("stream", ["--concurrency", "4", "--processes", "2", "--input", "jpeg"])])
def test_bench_json_and_request_count_match_the_server(srv, mode: str, extra: list[str]) -> None:
    method = {"unary": "Classify", "stream": "ClassifyStream"}[mode]
    before = requests_total(srv, method)
    # A request-bounded run: what is asserted never depends on how much work fits in a time window.
    r = run_cli("resnet-client", "bench", "--target", srv.address, "--mode", mode, "--warmup", "0",
                "--requests", "12", "--json", *extra)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    steps = doc["steps"]
    assert [s["concurrency"] for s in steps] == ([1, 3] if mode == "unary" else [4])
    for s in steps:
        assert {"concurrency", "rate", "mode", "input", "duration_s", "requests", "warmup_requests", "images_per_s",
                "latency_ms", "errors"} <= set(s)
        assert s["mode"] == mode and s["errors"] == {} and (s["requests"], s["warmup_requests"]) == (12, 0)
        assert s["images_per_s"] > 0 and s["duration_s"] > 0
        assert set(s["latency_ms"]) == {"p50", "p90", "p99", "max"}
        assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p90"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
    sent = sum(s["requests"] + s["warmup_requests"] for s in steps)
    assert requests_total(srv, method) - before == sent


def test_bench_refuses_a_negative_request_count(srv) -> None:
    r = run_cli("resnet-client", "bench", "--target", srv.address, "--rate", "10", "--requests", "-5")
    assert r.returncode == 2 and "--requests" in r.stderr and "Traceback" not in r.stderr


def test_bench_open_loop_counts_match_the_server(srv) -> None:
    before = requests_total(srv, "Classify")
    # Exactly 12 Poisson arrivals after the warm-up, counted by their scheduled times: however slow the machine,
    # the counts are the same (a duration-bounded window once saw none on a busy machine).
    r = run_cli("resnet-client", "bench", "--target", srv.address, "--rate", "100", "--warmup", "0.2",
                "--requests", "12", "--json")
    assert r.returncode == 0, r.stderr
    (step,) = json.loads(r.stdout)["steps"]
    assert step["rate"] == 100.0 and step["concurrency"] is None and step["requests"] == 12
    assert requests_total(srv, "Classify") - before == step["requests"] + step["warmup_requests"]


def test_bench_help_states_the_real_defaults() -> None:
    r = run_cli("resnet-client", "bench", "--help")
    assert r.returncode == 0 and r.stderr == ""
    text = " ".join(r.stdout.split())
    assert "e.g. 1,4,16 (default: 1)" in text and "(default: 5.0)" in text and "--input-data DIR" in text


@pytest.mark.parametrize("processes", [1, 2])
def test_bench_hands_over_each_step_as_it_ends(srv, processes: int) -> None:
    """When step 1 is reported, the server has seen exactly step 1's requests: nothing of step 2 was sent yet."""
    from resnet_serve.client.tools import load_report, loadgen

    config = loadgen.LoadConfig(target=srv.address, concurrency=(2, 2), warmup_s=0.1, requests=4,
                                processes=processes, input_hw=(SIZE, SIZE))
    before = requests_total(srv, "Classify")
    seen: list[tuple[dict, float]] = []
    steps = loadgen.run(config, on_step=lambda step: seen.append((step, requests_total(srv, "Classify"))))
    assert [step for step, _ in seen] == steps and len(steps) == 2
    first, at_first = seen[0]
    assert at_first - before == first["requests"] + first["warmup_requests"]
    assert load_report.format_row(first).startswith("unary")


@pytest.mark.parametrize("kind,extra", [("encoded", []), ("uint8", ["--input", "raw"])])
def test_bench_input_data_sends_the_users_images(srv, tmp_path, kind: str, extra: list[str]) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(picture(200 + i, 50, 70)))
    (tmp_path / "readme.txt").write_text("not an image")
    count = lambda: srv.metrics().get(("resnet_serve_preprocess_duration_seconds_count", (("kind", kind),)), 0)  # noqa: E731
    before = count()
    r = run_cli("resnet-client", "bench", "--target", srv.address, "--input-data", str(tmp_path), "--warmup", "0.1",
                "--requests", "6", "--json", *extra)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (step,) = doc["steps"]
    assert doc["input_data"] == str(tmp_path) and step["errors"] == {}
    assert count() - before == step["requests"] + step["warmup_requests"] > 0
    assert "3 image(s) from" in r.stderr and "c=1" in r.stderr  # the step's row, on stderr beside --json


# Last: a call abandoned by its client may still be answered (and counted) by the server a little later.
def test_tiny_timeout_is_deadline_exceeded(srv) -> None:
    errors = both_raise(srv.address, lambda c: c.classify(picture(0), timeout=1e-6),
                        lambda c: c.classify(picture(0), timeout=1e-6))
    assert [e.code for e in errors] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2


def test_tiny_stream_timeout_is_deadline_exceeded(srv, client) -> None:
    """The stream may end with the deadline, or (if the item got in first) answer the item with it."""
    def error_of(run: Callable) -> ClassifierError:
        try:
            (item,) = run()
        except ClassifierError as e:
            return e
        return item

    errors = [error_of(lambda: client.classify_many([picture(0)], timeout=1e-6)),
              error_of(lambda: aio(srv.address, lambda c: c.classify_many([picture(0)], timeout=1e-6)))]
    assert [type(e) for e in errors] == [ClassifierError] * 2
    assert [e.code for e in errors] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2


def test_token_reaches_an_authenticating_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("s3cret\n")
    server = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1,
                             auth_token_file=str(tmp_path / "tokens"))
    try:
        bearer = ChannelOptions(metadata=(("authorization", "Bearer s3cret"),))
        assert aio(server.address, lambda c: c.classify(picture(0)), options=bearer).predictions
        r = run_cli("resnet-client", "info", "--target", server.address, "--token", "s3cret")
        assert r.returncode == 0, r.stderr
        r = run_cli("resnet-client", "info", "--target", server.address, env={cli.TOKEN_ENV: "s3cret"})
        assert r.returncode == 0, r.stderr
        r = run_cli("resnet-client", "info", "--target", server.address, env={cli.TOKEN_ENV: ""})
        assert r.returncode == 1 and r.stderr.startswith("error: UNAUTHENTICATED: ")
    finally:
        server.close()


def test_aio_streams_core_internal_error_past_the_deadline_is_the_deadline() -> None:
    """grpc.aio ends ~3% of 1 us-deadline streams with INTERNAL "Internal error from Core" (measured: 7 of 200,
    the client's own batch failing, nothing from the server): reported as the deadline it is, only past it."""
    from grpc.aio import AioRpcError, Metadata

    from resnet_serve.client.aio import stream_error

    core = AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(), details="Internal error from Core")
    assert stream_error(core, deadline=0.0).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stream_error(core, deadline=float("inf")).code == grpc.StatusCode.INTERNAL  # deadline not reached
    assert stream_error(core, deadline=None).code == grpc.StatusCode.INTERNAL  # no deadline at all
    server = AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(), details="predictor failed")
    assert stream_error(server, deadline=0.0).code == grpc.StatusCode.INTERNAL  # a real server INTERNAL stays
