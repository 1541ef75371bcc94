"""The classifier.v1 client library: ClassifierClient (blocking) and AsyncClassifierClient (asyncio) with their
results, errors, channel and retry settings. Tools built on it (the `resnet-client` CLI, the load generator, the
demo) live in resnet_serve.client.tools; nothing here imports them."""

from .aio import AsyncClassifierClient
from .channel import ChannelOptions, target_string
from .errors import ClassifierError
from .images import ImageLike, to_request
from .results import Prediction, Result
from .retry import RetryPolicy
from .sync import ClassifierClient

__all__ = ["AsyncClassifierClient", "ChannelOptions", "ClassifierClient", "ClassifierError", "ImageLike",
           "Prediction", "Result", "RetryPolicy", "target_string", "to_request"]
