"""Test helpers: graph builders, PyTorch model builders, the model zoo."""
