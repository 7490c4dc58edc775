"""llava-cluster: LoRA/QLoRA fine-tuning of Hugging Face LLaVA models on SLURM and Kubernetes."""

__version__ = "0.1.0"
