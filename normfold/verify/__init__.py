"""Equivalence proof: references (ONNX or PyTorch), comparison, localisation, the verdict."""
