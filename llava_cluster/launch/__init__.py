"""Launchers: start `llava-cluster stage …` with the right distributed environment (local, SLURM,
Kubernetes). They never import training internals; training uses only `interrupt` (the stop file a
Ctrl-C writes), the job side `topology` and `parent_death`."""
