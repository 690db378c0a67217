"""The fuse pass: one matcher module per norm family, the emitter of fused ops."""
