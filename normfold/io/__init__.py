"""Model files: loading with structural checks, safe writing, external data, skeletons; input samples."""
