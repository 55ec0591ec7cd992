"""ONNX export and verification of the mean-gate graphs (needs the `train` extra)."""
