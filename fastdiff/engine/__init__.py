"""The sampling engine: `SamplingEngine` (engine.py) over CUDA-graph replay (graphs.py) or the compiled CPU loop
(cpu_loop.py), and the fingerprint of the weights a graph reads (weights.py)."""

from fastdiff.engine.cpu_loop import AUTO_TIMED_STEPS, LOOP_BELOW_SECONDS
from fastdiff.engine.engine import GRAPH_MODES, NOISE_BUFFER_BYTES, EngineStats, SamplingEngine, engine_for

__all__ = [
    "AUTO_TIMED_STEPS",
    "GRAPH_MODES",
    "LOOP_BELOW_SECONDS",
    "NOISE_BUFFER_BYTES",
    "EngineStats",
    "SamplingEngine",
    "engine_for",
]
