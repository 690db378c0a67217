"""Graph passes: plain functions over an onnx-graphsurgeon graph, each returning a PassReport."""
