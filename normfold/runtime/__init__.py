"""onnxruntime sessions with normfold's library, and runs that expose intermediate tensors."""
