"""Tools built on the client library (resnet_serve.client): the `resnet-client` CLI (cli), the load generator
(loadgen and its parts: load_steps, payloads, classifier_transport, oip_transport, load_report) and `make demo`
(demo). The library never imports these."""
