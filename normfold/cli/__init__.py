"""The command line: one click command per product command, options shared, rendering in `render`."""
