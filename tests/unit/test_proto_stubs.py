"""The committed stubs must be exactly what grpcio-tools generates from protos/resnet_serve/protos/classifier.proto."""

from __future__ import annotations

from pathlib import Path

from resnet_serve.protos import generate


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {"classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py"}
    for fresh in written:
        committed = generate.HERE / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), f"{fresh.name} is stale: run `make proto`"


def test_service_shape() -> None:
    from resnet_serve.protos import classifier_pb2

    service = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    assert classifier_pb2.DESCRIPTOR.package == "classifier.v1"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Classify": (False, False), "ClassifyStream": (True, True), "GetModelInfo": (False, False)}
    fields = classifier_pb2.ClassifyRequest.DESCRIPTOR.fields_by_name
    assert {"encoded", "tensor", "top_k", "request_id"} <= set(fields)
    assert {"request_id", "predictions", "error", "model_version"} <= set(
        classifier_pb2.ClassifyResponse.DESCRIPTOR.fields_by_name)
