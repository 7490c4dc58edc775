"""Validating a fine-tune on held-out samples: its scores, the base's, and what they are worth.

    run.py          the `validate` command and stage: the model and the base scored, the outputs written
    evaluate.py     one model over the held-out file: generation, scores, eval loss
    scoring.py      exact match and token F1 of an answer against its reference
    checkpoints.py  the run's checkpoints scored once, shared by the merge and validate stages
    stats.py        paired statistics of base vs fine-tune: bootstrap intervals, McNemar, changes, groups
    lmms_eval.py    the optional lmms-eval run on the merged model, in a subprocess
    report.py       the HTML report
    provenance.py   what produced the numbers: versions, commit, device, the training run
"""
