"""LLaVA conversation data: schema checks, templates, label masking, lazy dataset, sampler, collator."""
