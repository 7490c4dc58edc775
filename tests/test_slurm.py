"""SLURM backend without a cluster (launch/slurm.py): the batch scripts it would submit, the standalone
scripts' syntax, and that no spec value in them ever runs. The task's supervisor is test_slurm_job's."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llava_cluster.cli import main
from llava_cluster.errors import UserError
from llava_cluster.launch import slurm
from llava_cluster.spec import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm").glob("*.sbatch"))


def make_spec(tmp_path: Path, **sections) -> object:
    data = {
        "name": "render", "storage": str(tmp_path / "store"),
        "model": {"base": "/models/llava-13b"},
        "data": {"train": "/data/llava/train.json", "image_folder": "/data/llava/images"},
        "resources": {"nodes": 2, "gpus_per_node": 4, "cpus_per_task": 6, "mem": "400G", "time": "1-02:00:30"},
        "slurm": {"partition": "gpu", "account": "proj", "qos": "high", "signal_seconds": 300,
                  "extra_sbatch": ["--constraint=h100", "--exclusive"], "max_requeues": 5},
        "env": {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "WARN"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return spec_from_dict(data)


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            options[key] = value.strip("'")
    return options


def srun_line(script: str) -> str:
    return next(line for line in script.splitlines() if line.startswith("srun "))


def test_train_job_has_one_task_per_gpu_on_every_node_and_the_spec_resources(tmp_path):
    spec = make_spec(tmp_path)
    opts = sbatch_options(slurm.render(spec, "train", None))
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "4" and opts["gpus-per-node"] == "4"
    assert opts["cpus-per-task"] == "6" and opts["mem"] == "400G"
    assert opts["time"] == str(26 * 60 + 1)  # 1-02:00:30 rounded up to whole minutes
    assert opts["partition"] == "gpu" and opts["account"] == "proj" and opts["qos"] == "high"
    assert opts["constraint"] == "h100" and "exclusive" in opts
    assert opts["signal"] == "USR2@300"  # no B: prefix, so every rank gets it
    assert "requeue" in opts and opts["kill-on-invalid-dep"] == "yes"
    assert "dependency" not in opts
    assert opts["output"] == f"{spec.run_dir}/logs/slurm/%j_0_log.out"


def test_merge_and_validate_are_one_process_chained_afterok(tmp_path):
    spec = make_spec(tmp_path)
    for stage in ("merge", "validate"):
        opts = sbatch_options(slurm.render(spec, stage, "afterok:41"))
        assert (opts["nodes"], opts["ntasks-per-node"], opts["gpus-per-node"]) == ("1", "1", "1")
        assert opts["dependency"] == "afterok:41" and opts["kill-on-invalid-dep"] == "yes"
        assert opts["job-name"] == f"render-{stage}"


def test_environment_rendezvous_and_requeue_lines(tmp_path):
    spec = make_spec(tmp_path)
    script = slurm.render(spec, "train", None)
    assert "export NCCL_SOCKET_IFNAME=ib0" in script and "export NCCL_DEBUG=WARN" in script
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    teardown = script[script.index("# teardown"):]
    marker = f"{spec.run_dir}/logs/slurm/requeue-$SLURM_JOB_ID"
    assert f"if [ -e {marker} ]" in teardown and 'scontrol requeue "$SLURM_JOB_ID"' in teardown
    between = script[script.index(srun_line(script)) + len(srun_line(script)):script.index("srun_status=$?")]
    assert not [line for line in between.splitlines() if line and not line.startswith("#")]  # $? is srun's
    assert teardown.rstrip().endswith('exit "$srun_status"')  # a failed stage must fail the job


def test_no_container_runs_this_python(tmp_path):
    line = srun_line(slurm.render(make_spec(tmp_path), "train", None))
    assert f"{sys.executable} -u -m submitit.core._submit" in line
    assert "--container" not in line and "apptainer" not in line


def test_pyxis_mounts_storage_and_inputs_at_the_same_path(tmp_path):
    spec = make_spec(tmp_path, slurm={"container": {"runtime": "pyxis", "image": "ghcr.io#org/llava:1",
                                                   "mounts": ["/scratch:/scratch"]}})
    line = srun_line(slurm.render(spec, "train", None))
    store = spec.storage
    assert "--container-image=ghcr.io#org/llava:1" in line
    assert (f"--container-mounts={store}:{store},/data/llava:/data/llava,/models/llava-13b:/models/llava-13b,"
            "/scratch:/scratch") in line  # images/ is inside /data/llava: mounted once
    assert line.endswith(f"python3 -u -m submitit.core._submit {spec.run_dir}/logs/slurm")


def test_apptainer_wraps_the_worker_with_binds(tmp_path):
    spec = make_spec(tmp_path, slurm={"container": {"runtime": "apptainer", "image": "/images/llava.sif"}})
    line = srun_line(slurm.render(spec, "merge", None))
    assert (f"apptainer exec --nv --bind {spec.storage},/data/llava,/models/llava-13b /images/llava.sif "
            "python3 -u -m submitit.core._submit") in line
    assert "--container-image" not in line


def test_inputs_under_storage_need_no_extra_mount(tmp_path):
    store = tmp_path / "store"
    spec = make_spec(tmp_path, model={"base": str(store / "models/m")},
                     data={"train": str(store / "data/t.json"), "image_folder": str(store / "data/img")})
    assert slurm.container_mounts(spec) == [str(store)]


def test_every_local_path_of_the_spec_is_mounted_a_file_by_its_folder(tmp_path):
    """A DeepSpeed JSON and lmms-eval's include_path outside storage are mounted too, in the rendered
    Apptainer and pyxis commands; the data files by their folders."""
    ds_json = tmp_path / "configs" / "zero3.json"
    ds_json.parent.mkdir()
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    sections = {"training": {"deepspeed": str(ds_json)}, "data": {"eval": "/data/held-out/val.json"},
                "validation": {"lmms_eval": {"tasks": ["mmmu_val"], "include_path": "/opt/lmms-tasks"}}}
    # storage first, then the shorter (a parent before its children)
    expected = [str(tmp_path / "store"), "/data/llava", "/data/held-out", "/opt/lmms-tasks", "/models/llava-13b",
                str(ds_json.parent)]
    apptainer = make_spec(tmp_path, **sections, slurm={"container": {"runtime": "apptainer", "image": "/i.sif"}})
    assert slurm.container_mounts(apptainer) == expected
    line = srun_line(slurm.render(apptainer, "validate", None))
    assert f"apptainer exec --nv --bind {','.join(expected)} /i.sif python3" in line
    pyxis = make_spec(tmp_path, **sections, slurm={"container": {"runtime": "pyxis", "image": "org/llava:1"}})
    line = srun_line(slurm.render(pyxis, "train", None))
    assert f"--container-mounts={','.join(f'{m}:{m}' for m in expected)} " in line


def test_dry_run_prints_three_chained_scripts_and_submits_nothing(tmp_path, capsys):
    spec = make_spec(tmp_path)
    assert slurm.submit(spec, ["train", "merge", "validate"], dry_run=True) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 3
    assert "--dependency='afterok:<train job id>'" in out and "--dependency='afterok:<merge job id>'" in out
    assert f"{sys.executable} -m llava_cluster.cli stage validate --run-dir {spec.run_dir}" in out
    assert not spec.run_dir.exists()


def test_resubmission_of_later_stages_has_no_dependency_on_train(tmp_path, capsys):
    spec = make_spec(tmp_path)
    slurm.submit(spec, ["validate", "merge"], dry_run=True)
    out = capsys.readouterr().out
    assert out.index("merge job") < out.index("validate job")
    assert "afterok:<train" not in out and "afterok:<merge job id>" in out


@pytest.mark.parametrize("text,minutes", [("90", 90), ("5:30", 6), ("04:00:00", 240), ("2-00", 2880),
                                          ("1-01:30", 1530), ("0:0:59", 1)])
def test_slurm_time_formats(text, minutes):
    assert slurm.slurm_minutes(text) == minutes


def test_stage_runs_with_the_workers_interpreter_unless_slurm_python_says_otherwise(tmp_path):
    """Without a container the worker starts as this absolute interpreter; the stage must not need
    `llava-cluster` on the job's PATH (an unactivated venv). Inside a container: the image's python3."""
    cli = ("-m", "llava_cluster.cli", "stage", "train", "--run-dir")
    job = slurm.stage_job(make_spec(tmp_path), "train", [])
    assert job.command[:6] == (sys.executable, *cli)
    pyxis = make_spec(tmp_path, slurm={"container": {"runtime": "pyxis", "image": "reg#org/llava:1"}})
    assert slurm.stage_job(pyxis, "train", []).command[:6] == ("python3", *cli)
    custom = make_spec(tmp_path, slurm={"python": "/shared/envs/llava/bin/llava-cluster --verbose"})
    assert slurm.stage_job(custom, "merge", []).command[:3] == ("/shared/envs/llava/bin/llava-cluster", "--verbose",
                                                                "stage")
    help_run = subprocess.run([*job.command[:3], "--help"], capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin"})
    assert help_run.returncode == 0 and "stage" in help_run.stdout


def test_bad_time_and_extra_option_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="resources.time: '2 hours'"):
        slurm.slurm_minutes("2 hours")
    with pytest.raises(UserError, match="slurm.extra_sbatch: '-C h100'"):
        slurm.render(make_spec(tmp_path, slurm={"extra_sbatch": ["-C h100"]}), "train", None)


def test_qlora_on_two_nodes_is_refused_by_submit(tmp_path, capsys):
    spec_file = tmp_path / "q.yaml"
    spec_file.write_text(json.dumps({
        "name": "q", "storage": str(tmp_path), "method": "qlora", "model": {"base": str(tmp_path)},
        "data": {"train": str(spec_file)}, "training": {"deepspeed": "zero2"}, "resources": {"nodes": 2}}))
    assert main(["submit", str(spec_file), "--backend", "slurm", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "QLoRA runs on one node" in err and "resources.nodes=2" in err and "Traceback" not in err


# ---- standalone scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_standalone_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_scripts_put_every_directive_before_the_first_command():
    for script in (REPO / "slurm").glob("*.sbatch"):
        lines = script.read_text().splitlines()
        first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
        directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
        assert directives and max(directives) < first_command, script.name


def test_pipeline_refuses_a_run_dir_without_spec(tmp_path):
    env = {**os.environ, "RUN_DIR": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "slurm/pipeline.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and f"{tmp_path}/spec.yaml not found" in result.stderr


# ---- hostile spec values: every legal value rendered so that nothing in it runs ---------------------

# Legal values full of shell syntax; running any of them creates a PWNED-* file in the job's directory.
SHELL_PAYLOADS = ["$(touch PWNED-1)", "`touch PWNED-2`", "x; touch PWNED-3", "a' ; touch PWNED-4 ; '",
                  'b" ; touch PWNED-5 ; "', "c && touch PWNED-6 # d", "$HOME ${IFS} * ?"]


@pytest.fixture
def stubs(tmp_path):
    """srun / scontrol / sbatch that only record their arguments (NUL-separated) and the environment
    values the test names in CAPTURE_ENV."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    record = ('#!/bin/bash\nprintf "%s\\0" "$@" > "$CAPTURE_DIR/$(basename "$0").args"\n'
              'for v in $CAPTURE_ENV; do printf "%s\\0" "${!v}"; done > "$CAPTURE_DIR/$(basename "$0").env"\n')
    for tool, reply in (("srun", ""), ("sbatch", 'echo "4$RANDOM"\n'), ("scontrol", "echo n1\n")):
        path = bin_dir / tool
        path.write_text(record + reply)
        path.chmod(0o755)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    return bin_dir, workdir


def run_with_stubs(stubs, script: str | Path, env: dict[str, str], capture_env: list[str] = ()) -> dict:
    bin_dir, workdir = stubs
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(workdir), "SLURM_JOB_ID": "123",
                "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1", "CAPTURE_DIR": str(workdir),
                "CAPTURE_ENV": " ".join(capture_env), **env}
    args = ["bash", "-c", script] if isinstance(script, str) else ["bash", str(script)]
    proc = subprocess.run(args, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=60)
    assert not list(workdir.glob("PWNED*")), f"a spec value ran as a command:\n{proc.stdout}{proc.stderr}"

    def read(name: str) -> list[str] | None:
        path = workdir / name
        return path.read_text().split("\0")[:-1] if path.exists() else None

    return {"rc": proc.returncode, "out": proc.stdout + proc.stderr, "srun": read("srun.args"),
            "srun_env": read("srun.env"), "sbatch": read("sbatch.args")}


@pytest.mark.parametrize("runtime", ["none", "pyxis", "apptainer"])
def test_rendered_sbatch_script_runs_no_spec_value(tmp_path, stubs, runtime):
    """Paths, env values, container image/mounts and sbatch option values full of shell syntax: the
    script still runs, srun receives each value as one exact argument, no payload executes."""
    hostile = "".join(SHELL_PAYLOADS[:6])
    store = tmp_path / f"store {hostile}"
    env = {f"V{i}": payload for i, payload in enumerate(SHELL_PAYLOADS)}
    container = {"runtime": runtime}
    if runtime != "none":
        container.update(image=f"/images/llava {SHELL_PAYLOADS[0]}.sif", mounts=[f"/scratch/{SHELL_PAYLOADS[2]}"])
    base = make_spec(tmp_path, env=env, slurm={"container": container, "extra_sbatch": [f"--comment={hostile}"]})
    spec = spec_from_dict({**base.to_dict(), "storage": str(store), "model": {"base": f"/models/{SHELL_PAYLOADS[1]}"}})
    script = slurm.render(spec, "train", None)
    result = run_with_stubs(stubs, script, {}, capture_env=list(env))
    assert result["rc"] == 0, result["out"]
    assert result["srun_env"] == SHELL_PAYLOADS  # exported exactly, nothing expanded
    argv = result["srun"]
    folder = str(slurm.logs_folder(spec))
    assert argv[-1] == folder and argv[argv.index("--output") + 1] == f"{folder}/%j_%t_log.out"
    if runtime == "pyxis":
        assert f"--container-image={spec.slurm.container.image}" in argv
    if runtime == "apptainer":
        assert argv[argv.index("exec") + 4] == spec.slurm.container.image
    assert f"--comment={shlex.quote(hostile)}" in script  # an #SBATCH value: one quoted word


def test_standalone_scripts_run_no_value_of_their_settings(tmp_path, stubs):
    """RUN_DIR, LLAVA_CLUSTER, PARTITION, ... with shell syntax: passed as arguments, never run."""
    run_dir = tmp_path / f"runs {SHELL_PAYLOADS[0]}{SHELL_PAYLOADS[2]}"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text("name: x\n")
    settings = {"RUN_DIR": str(run_dir), "LLAVA_SLURM_DIR": str(REPO / "slurm"), "LLAVA_CLUSTER": "true",
                "STORAGE": f"/st {SHELL_PAYLOADS[1]}", "CONTAINER_RUNTIME": "pyxis", "CONTAINER_IMAGE": "img",
                "CONTAINER_MOUNTS": SHELL_PAYLOADS[3]}
    result = run_with_stubs(stubs, REPO / "slurm/merge.sbatch", settings)
    assert result["rc"] == 0, result["out"]
    assert result["srun"] == ["--container-image=img",
                              f"--container-mounts=/st {SHELL_PAYLOADS[1]}:/st {SHELL_PAYLOADS[1]},{SHELL_PAYLOADS[3]}",
                              "true", "stage", "merge", "--run-dir", str(run_dir)]
    piped = run_with_stubs(stubs, REPO / "slurm/pipeline.sh", {
        "RUN_DIR": str(run_dir), "PARTITION": SHELL_PAYLOADS[4], "ACCOUNT": SHELL_PAYLOADS[5],
        "QOS": SHELL_PAYLOADS[0], "NODES": SHELL_PAYLOADS[1]})
    assert piped["rc"] == 0, piped["out"]
    assert f"--partition={SHELL_PAYLOADS[4]}" in piped["sbatch"] and f"--qos={SHELL_PAYLOADS[0]}" in piped["sbatch"]


def test_pipeline_passes_the_absolute_llava_cluster_of_the_submitting_shell(tmp_path, stubs):
    """Without a container the jobs must not depend on an activated venv on the nodes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text("name: x\n")
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "llava-cluster").is_file()
    bin_dir, _ = stubs
    script = f'PATH="{venv_bin}:$PATH" bash {REPO / "slurm/pipeline.sh"}'
    result = run_with_stubs(stubs, script, {"RUN_DIR": str(run_dir)}, capture_env=["LLAVA_CLUSTER"])
    assert result["rc"] == 0, result["out"]
    recorded = (stubs[1] / "sbatch.env").read_text().split("\0")[:-1]
    assert recorded == [str(venv_bin / "llava-cluster")]


def test_standalone_stage_says_when_llava_cluster_is_not_on_the_nodes_path(tmp_path, stubs):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text("name: x\n")
    result = run_with_stubs(stubs, REPO / "slurm/validate.sbatch", {
        "RUN_DIR": str(run_dir), "LLAVA_SLURM_DIR": str(REPO / "slurm"), "LLAVA_CLUSTER": "/nowhere/llava-cluster"})
    assert result["rc"] == 2 and result["srun"] is None
    assert "/nowhere/llava-cluster not found on this node's PATH: set LLAVA_CLUSTER" in result["out"]
