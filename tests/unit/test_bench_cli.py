"""`resnet-client bench` arguments refused before any connection: one `error:` line and exit 2
(client/resnet_serve/client/tools/cli.py); and the OIP inputs a --batch builds
(client/resnet_serve/client/tools/oip_transport.py). Runs against a server: tests/integration/test_client.py and
test_oip.py."""

from __future__ import annotations

import pytest

from resnet_serve.client.tools.cli import main
from resnet_serve.client.tools.oip_transport import infer_inputs

CLOSED = "127.0.0.1:1"  # never reached: every case here is refused before connecting


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("protocol", [[], ["--protocol", "classifier"]])
def test_a_batch_over_classifier_v1_is_a_usage_error(protocol: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--target", CLOSED, "--batch", "2", *protocol]) == 2
    line = one_error_line(capsys)
    assert "--batch" in line and "--protocol oip" in line


@pytest.mark.parametrize("value", ["0", "-3", "1025"])
def test_a_batch_out_of_range_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--target", CLOSED, "--protocol", "oip", "--model", "m", "--batch", value]) == 2
    assert "--batch must be between 1 and 1024" in one_error_line(capsys)


@pytest.mark.parametrize("value", ["x", "1.5", ""])
def test_a_batch_that_is_no_integer_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--target", CLOSED, "--protocol", "oip", "--model", "m", "--batch", value])
    assert e.value.code == 2
    assert "--batch" in one_error_line(capsys)


@pytest.mark.parametrize("kind,name,datatype,shape", [("raw", "uint8_hwc", "UINT8", [3, 12, 20, 3]),
                                                      ("jpeg", "encoded", "BYTES", [3, 1])])
def test_oip_inputs_carry_the_batch_dimension(kind: str, name: str, datatype: str, shape: list[int]) -> None:
    inputs = infer_inputs(kind, (12, 20), batch=3)
    assert {(t.name(), t.datatype()) for t in inputs} == {(name, datatype)}
    assert all(t.shape() == shape for t in inputs)
    assert [t.shape()[0] for t in infer_inputs(kind, (12, 20))] == [1] * 8  # the default: one image each
