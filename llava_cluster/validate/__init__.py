"""Validating a fine-tune on held-out samples: its scores, the base's, and what they are worth.

    run.py          the `validate` command and stage: scores the model (and the base), writes the outputs
    stats.py        paired statistics of base vs fine-tune: bootstrap intervals, McNemar, changes, groups
    lmms_eval.py    the optional lmms-eval run on the merged model, in a subprocess
    report.py       the HTML report
    provenance.py   what produced the numbers: versions, commit, device, the training run
"""
