"""Launchers: start `llava-cluster stage …` with the right distributed environment (local, SLURM,
Kubernetes). They never import training internals; training never imports them."""
