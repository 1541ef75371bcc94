"""The gRPC server: transports, the dynamic batcher and the worker processes that run Paddle predictors."""
