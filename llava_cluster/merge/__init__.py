"""Folding a trained adapter into its base: a standard HF checkpoint.

    run.py              the `merge` command and stage: picks in-memory or streaming, writes the merge record
    streaming.py        the merge one tensor at a time (never the whole model in memory)
    memory.py           will an in-memory merge fit in this process's memory?
    safetensors_io.py   checkpoint shards: their keys, one tensor at a time in, a streamed file out
    verify.py           the checks a merge must pass: probe logits (in memory), tensor by tensor (streamed)
"""
