"""ONNX export, graph checks and TensorRT engine builds."""
