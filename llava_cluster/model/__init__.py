"""Model side: loading a base LLaVA (full precision or 4-bit), the family table, the image token.
The lowest room: it imports nothing above it (the tiny test model lives in `tiny/`)."""
