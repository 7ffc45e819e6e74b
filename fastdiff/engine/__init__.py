"""The sampling engine: `SamplingEngine` (engine.py) over CUDA-graph replay (graphs.py) or the compiled CPU loop
(cpu_loop.py), and the fingerprint of the weights a graph reads (weights.py); the planner (planner.py) choosing among
the backends of candidates.py (eager, compile, cuda-graphs, onnxruntime, openvino, tensorrt, aoti) for backend="auto"."""

from fastdiff.engine.cpu_loop import AUTO_TIMED_STEPS, LOOP_BELOW_SECONDS
from fastdiff.engine.engine import GRAPH_MODES, NOISE_BUFFER_BYTES, EngineStats, SamplingEngine, engine_for
from fastdiff.engine.planner import BACKENDS, Plan, Planner

__all__ = [
    "AUTO_TIMED_STEPS",
    "BACKENDS",
    "GRAPH_MODES",
    "LOOP_BELOW_SECONDS",
    "NOISE_BUFFER_BYTES",
    "EngineStats",
    "Plan",
    "Planner",
    "SamplingEngine",
    "engine_for",
]
