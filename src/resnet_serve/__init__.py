"""resnet-serve: a PaddlePaddle ResNet from checkpoint to a dynamically batched gRPC service.

The subpackages live in the repository's top-level folders (train/, export/, server/, client/, protos/)
and are mapped under this namespace by pyproject.toml.
"""

__version__ = "0.1.0"
