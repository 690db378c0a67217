"""normfold's fused ops: the op table, their standard-ONNX function bodies, the kernel library."""
