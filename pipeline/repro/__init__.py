"""Reproducibility: the numerics probe (`ownllm repro probe`) and the rebuild check (`ownllm repro check`)."""
