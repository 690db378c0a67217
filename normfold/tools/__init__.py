"""Tools around the passes: export from PyTorch, bench, inspect, doctor, demo."""
