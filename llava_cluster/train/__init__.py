"""Training: model setup (LoRA/QLoRA), optimizer groups, the HF Trainer subclass, artifacts, preemption."""
