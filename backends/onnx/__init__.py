"""ONNX backend: a KV-cached decoder exported with torch.onnx (dynamo), run and quantized with onnxruntime."""
