"""Checkpoint -> verified, versioned static-graph Paddle Inference model folder (fp32, fp16, int8)."""
