"""spec.yaml in a run directory (spec/frozen.py): written once, a different spec under the same name refused."""

from __future__ import annotations

import pytest
from test_spec_load import write

from llava_cluster.errors import UserError
from llava_cluster.spec import load_spec


def test_resubmitting_a_different_spec_under_the_same_name_is_refused(tmp_path, tiny_dir):
    from llava_cluster.rundir import RunDir
    from llava_cluster.spec.frozen import freeze

    path = write(tmp_path, model={"base": str(tiny_dir.model)}, data={"train": str(tiny_dir.train)})
    spec = load_spec(path)
    freeze(spec, RunDir(spec.run_dir))
    freeze(spec, RunDir(spec.run_dir))  # the same spec again: fine
    with pytest.raises(UserError, match="different spec .*optim"):
        freeze(load_spec(path, ["optim.lr=1e-3"]), RunDir(spec.run_dir))
