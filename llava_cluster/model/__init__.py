"""Model side: loading a base LLaVA (full precision or 4-bit) and building the tiny test model."""
