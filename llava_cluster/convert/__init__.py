"""`llava-cluster convert`: bring outputs of the original LLaVA repo in once. `original` turns a checkpoint
into HF LLaVA (model/ level), `adapter` a LoRA output into our adapter layout (`llava_cluster/adapter.py`)."""
