"""fastdiff.export: ONNX graphs run by onnxruntime or OpenVINO, and TensorRT engines, behind the denoiser protocol.

onnx, onnxruntime, openvino and tensorrt are imported only when a function needs them.
"""

from fastdiff.export.onnx import ExportReport, OnnxDenoiser, to_onnx
from fastdiff.export.openvino import OpenVinoDenoiser, to_openvino
from fastdiff.export.tensorrt import TensorRTDenoiser, build_tensorrt_engine

__all__ = [
    "ExportReport",
    "OnnxDenoiser",
    "OpenVinoDenoiser",
    "TensorRTDenoiser",
    "build_tensorrt_engine",
    "to_onnx",
    "to_openvino",
]
