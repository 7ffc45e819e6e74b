"""fastdiff.export: ONNX graphs run by onnxruntime, and TensorRT engines, behind the denoiser protocol.

onnx, onnxruntime and tensorrt are imported only when a function needs them.
"""

from fastdiff.export.onnx import ExportReport, OnnxDenoiser, to_onnx
from fastdiff.export.tensorrt import TensorRTDenoiser, build_tensorrt_engine

__all__ = ["ExportReport", "OnnxDenoiser", "TensorRTDenoiser", "build_tensorrt_engine", "to_onnx"]
