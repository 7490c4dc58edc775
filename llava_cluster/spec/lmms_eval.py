"""`validation.lmms_eval`: the optional lmms-eval block of the validate stage, as a spec section (what
runs it, and why it may be skipped, is in validate/lmms_eval.py)."""

from __future__ import annotations

from pydantic import Field, model_validator

from llava_cluster.spec.base import Section


class LmmsEvalSpec(Section):
    """Which lmms-eval tasks to run on the merged model, and how."""

    tasks: list[str] = Field(min_length=1, description="lmms-eval task (or group) names, e.g. [mme, textvqa_val]")
    limit: int | None = Field(None, ge=1, description="at most this many documents per task (None: all)")
    batch_size: int = Field(1, ge=1, description="lmms-eval's --batch_size (its llava_hf model takes 1 only)")
    include_path: str | None = Field(None, description="folder of local task YAMLs (lmms-eval --include_path)")
    model: str = Field("llava_hf", description="lmms-eval model backend that loads the merged checkpoint")
    python: str | None = Field(None, description="interpreter that has lmms-eval installed (default: this one)")

    @model_validator(mode="after")
    def _llava_hf_batch(self) -> LmmsEvalSpec:
        if self.model == "llava_hf" and self.batch_size != 1:
            raise ValueError("lmms-eval's llava_hf model generates one document at a time: batch_size must be 1")
        return self
