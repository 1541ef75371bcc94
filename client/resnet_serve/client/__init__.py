"""The classifier.v1 client library: ClassifierClient (resnet_serve.client.sync, blocking) and
AsyncClassifierClient (resnet_serve.client.aio, asyncio); each of the two modules also exports the names a caller
needs with it (ClassifierError, ChannelOptions, RetryPolicy, Result). Tools built on the library (the
`resnet-client` CLI, the load generator, the demo) live in resnet_serve.client.tools; nothing here imports them.
Nothing is imported here: a package __init__ importing its own modules would be an import circle."""
