"""Inference: the sampler, one video, many videos, and loading any adapter source."""
