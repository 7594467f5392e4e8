"""Toy models and data for the demo, the docs, the tests and the quality benchmark (not part of the runtime).

- `paro_compile.toy.dit`: a small built-in video DiT (`toy_model`, `toy_inputs`, `toy_calibration_inputs`);
- `paro_compile.toy.cogvideox`: the trained toy CogVideoX fixture, its sampler and model inputs;
- `paro_compile.toy.videos`: the fixture's prompt vocabulary and procedurally drawn training videos.

``paro_compile.toy:toy_model`` and ``paro_compile.toy:toy_calibration_inputs`` are the factories the CLI examples use.
"""
from paro_compile.toy.dit import ToyVideoDiT, toy_calibration_inputs, toy_inputs, toy_model

__all__ = ["ToyVideoDiT", "toy_model", "toy_inputs", "toy_calibration_inputs"]
