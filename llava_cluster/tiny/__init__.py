"""A tiny random LLaVA and a synthetic dataset it can learn: `build` writes both, `task` draws the data,
`cli` is `llava-cluster tiny`. Above model/ and data/: it builds a model and renders conversations."""
