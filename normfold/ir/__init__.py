"""The graph model: ONNX <-> onnx-graphsurgeon conversion and the few graph verbs the passes use."""
