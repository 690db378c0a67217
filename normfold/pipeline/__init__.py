"""Running passes: the Python API (in memory) and the file runners behind the commands."""
