"""ResNet training with Paddle AMP (O1/O2), periodic checkpoints and resume; writes what export/ reads."""
