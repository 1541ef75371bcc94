"""The classifier.v1 gRPC API: the .proto and its committed stubs (regenerate with `make proto`)."""
