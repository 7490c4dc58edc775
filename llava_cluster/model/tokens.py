"""The image placeholder token that LLaVA vocabularies and LLaVA data files agree on.

Defined in model/, the lower room, because the model builders and converters add it to tokenizers;
the data tools find it in conversations through `data/templates.py`, which re-exports it.
"""

IMAGE_TOKEN = "<image>"  # the processor expands it into the image's feature tokens
