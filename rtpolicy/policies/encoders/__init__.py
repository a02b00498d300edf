"""Observation encoders: obs dicts -> condition tokens (B, N, D) for the denoisers.

``state`` (vector keys), ``image`` (camera frames: ResNet-18/GroupNorm or a small CNN + spatial softmax),
``language`` (instruction embeddings and their token), ``observation`` (the composition every head uses).
"""
