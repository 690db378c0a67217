"""Graph passes over onnx-graphsurgeon graphs (importable as `normfold.passes`).

Each pass is a function `pass(graph, **options) -> PassReport` that rewrites
the graph in place and reports what it changed, what it skipped and why.
"""
