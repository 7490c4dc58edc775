"""`render()` and `submit()` of the Kubernetes launcher under both APIs (Kubeflow Trainer v2, training
operator v1): valid manifests (offline schemas, strict), the pod policy, Kueue and gang settings, the
merge/validate ordering, and what submit does with kubectl present, absent or failing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_checks import REPO, assert_policy, by_component, pod_templates, runtime_of, validate

from llava_cluster.errors import UserError
from llava_cluster.launch import k8s
from llava_cluster.spec import load_spec, spec_from_dict

ALL = ["train", "merge", "validate"]
OVERLAYS = REPO / "k8s" / "overlays"


def tiny_spec(**k8s_fields):
    """jobs/tiny-local.yaml as on a small test cluster: tiny model and data copied onto the volume,
    two pods of one rank each."""
    overrides = ["storage=/shared", "model.base=/shared/tiny/model", "data.train=/shared/tiny/data/train.json",
                 "data.eval=/shared/tiny/data/val.json", "data.image_folder=/shared/tiny/data/images",
                 "resources.nodes=2", "resources.gpus_per_node=1", "resources.cpus_per_task=2", "k8s.shm_size=1Gi"]
    return load_spec(REPO / "jobs" / "tiny-local.yaml", overrides + [f"k8s.{k}={v}" for k, v in k8s_fields.items()])


def example(name: str):
    return load_spec(OVERLAYS / name / "run.yaml")


SPECS = {"tiny": tiny_spec,
         **{f"jobs/{p.stem}": (lambda p=p: load_spec(p)) for p in sorted((REPO / "jobs").glob("*.yaml"))}}
EXAMPLES = sorted(p.name for p in OVERLAYS.iterdir())
# the cluster kinds: plain, Kueue, Volcano / coscheduling gangs, with a PriorityClass
CLUSTERS = {"plain": {}, "kueue": {"queue": "team-a", "priority_class": "research"},
            "volcano": {"gang": "volcano"}, "coscheduling": {"gang": "coscheduling", "priority_class": "high"}}


def on(spec, api: str, cluster: str = "plain"):
    """The spec as submitted with that API to a cluster of that kind."""
    data = spec.to_dict()
    data["k8s"] = {**data["k8s"], "api": api, "queue": None, "gang": None, "priority_class": None, **CLUSTERS[cluster]}
    return spec_from_dict(data)


def train_kinds(spec) -> list[str]:
    if spec.k8s.api == "trainer-v2":
        return ["TrainingRuntime", "TrainJob"]
    return ["Job" if spec.method == "qlora" else "PyTorchJob"]


def _check(spec) -> list[dict]:
    docs = k8s.render(spec, ALL)
    assert [d["kind"] for d in docs] == ["ConfigMap", *train_kinds(spec), "Job", "Job"]
    for doc in docs:
        validate(doc)
    assert_policy(docs, spec)
    return docs


@pytest.mark.parametrize("api", ["trainer-v2", "pytorchjob"])
@pytest.mark.parametrize("which", SPECS)
def test_every_job_spec_renders_valid_manifests_under_both_apis(which, api):
    docs = _check(on(SPECS[which](), api))
    # the ConfigMap carries the spec itself: loading it back gives the same run
    frozen = yaml.safe_load(docs[0]["data"]["spec.yaml"])
    assert spec_from_dict(frozen).digest() == on(SPECS[which](), api).digest()


@pytest.mark.parametrize("overlay", EXAMPLES)
def test_example_runs_render_valid_manifests(overlay):
    _check(example(overlay))


@pytest.mark.parametrize("cluster", [c for c in CLUSTERS if c != "plain"])
@pytest.mark.parametrize("api", ["trainer-v2", "pytorchjob"])
def test_queue_gang_and_priority_settings_render_valid_manifests(api, cluster):
    docs = _check(on(load_spec(REPO / "jobs" / "lora-13b-multinode.yaml"), api, cluster))
    workloads = [d for d in docs if d["kind"] in ("TrainJob", "PyTorchJob", "Job")]
    assert len(workloads) == 3
    if cluster == "kueue":
        assert all(d["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" for d in workloads)


def test_trainer_v2_gang_is_the_runtimes_pod_group_policy():
    spec = on(load_spec(REPO / "jobs" / "lora-13b-multinode.yaml"), "trainer-v2", "coscheduling")
    docs = k8s.render(spec, ["train"])
    runtime = runtime_of(docs, by_component(docs)["train"])
    assert runtime["spec"]["podGroupPolicy"] == {"coscheduling": {"scheduleTimeoutSeconds": 600}}
    (template,) = pod_templates(runtime)
    assert template["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    assert template["spec"]["priorityClassName"] == "high"
    docs = k8s.render(on(spec, "trainer-v2", "volcano"), ["train"])
    assert runtime_of(docs, by_component(docs)["train"])["spec"]["podGroupPolicy"] == {"volcano": {}}


def test_pytorchjob_gang_is_a_pod_group_of_all_nodes_and_kueue_suspends_its_run_policy():
    spec = on(load_spec(REPO / "jobs" / "lora-13b-multinode.yaml"), "pytorchjob", "coscheduling")
    run_policy = by_component(k8s.render(spec, ["train"]))["train"]["spec"]["runPolicy"]
    assert run_policy["schedulingPolicy"] == {"minAvailable": 2, "priorityClass": "high"}
    assert "suspend" not in run_policy
    queued = by_component(k8s.render(on(spec, "pytorchjob", "kueue"), ["train"]))["train"]["spec"]["runPolicy"]
    assert queued["suspend"] is True and "schedulingPolicy" not in queued


def test_trainjob_sizes_the_run_and_references_its_own_runtime():
    spec = example("lora-multinode")
    docs = k8s.render(spec, ["train"])
    assert [d["kind"] for d in docs] == ["ConfigMap", "TrainingRuntime", "TrainJob"]
    train_job = by_component(docs)["train"]
    assert train_job["metadata"]["name"] == "lora-13b-multinode-train"
    assert train_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "user-queue"
    assert train_job["spec"]["suspend"] is True
    assert train_job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                               "name": "lora-13b-multinode-runtime"}
    trainer = train_job["spec"]["trainer"]
    assert trainer == {"args": ["train", "--run-dir", "/shared/runs/lora-13b-multinode",
                                "--spec", "/etc/llava-cluster/spec.yaml"],
                       "numNodes": 2, "numProcPerNode": 8,
                       "resourcesPerNode": {"requests": {"cpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}}
    runtime = runtime_of(docs, train_job)
    assert "kueue.x-k8s.io/queue-name" not in runtime["metadata"]["labels"]  # runs no pods itself
    assert runtime["spec"]["mlPolicy"] == {"torch": {}}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert node["template"]["spec"]["backoffLimit"] == 0
    assert runtime["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 3}
    pod = node["template"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "node" and c["image"] == spec.k8s.image and "args" not in c
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}


def test_an_admins_cluster_training_runtime_gets_our_pod_policy_as_a_runtime_patch():
    spec = on(load_spec(REPO / "jobs" / "lora-13b-multinode.yaml", ["k8s.hub_token_secret=hf-token"]), "trainer-v2",
              "kueue")
    spec = spec_from_dict({**spec.to_dict(), "k8s": {**spec.to_dict()["k8s"], "priority_class": None,
                                                     "runtime_ref": "torch-distributed",
                                                     "service_account": "llava-cluster"}})
    docs = k8s.render(spec, ALL)
    assert [d["kind"] for d in docs] == ["ConfigMap", "TrainJob", "Job", "Job"]  # no runtime of ours
    for doc in docs:
        validate(doc)  # runtimePatches strictly against the v2.3.0 TrainJob CRD
    train_job = by_component(docs)["train"]
    assert train_job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                               "name": "torch-distributed"}
    trainer = train_job["spec"]["trainer"]
    assert trainer["image"] == spec.k8s.image and trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in trainer["env"]
    (patch,) = train_job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    upstream = yaml.safe_load((REPO.parent / "shared" / "k8s-schemas" / "trainer-v2" /
                               "example-clustertrainingruntime-torch-distributed.yaml").read_text())
    assert node["name"] in [r["name"] for r in upstream["spec"]["template"]["spec"]["replicatedJobs"]]
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == "llava-cluster"  # k8s/base's account: no token mounted
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "llava-shared"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    (c,) = pod["containers"]
    assert c["name"] == "node" and {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert train_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and train_job["spec"]["suspend"]


@pytest.mark.parametrize("extra, message", [(["k8s.api=pytorchjob"], "needs api: trainer-v2"),
                                            (["k8s.priority_class=high"], "priority_class cannot be set"),
                                            (["k8s.gang=volcano"], "gang cannot be set")])
def test_runtime_ref_settings_trainer_v2_cannot_patch_are_refused_at_load(extra, message):
    with pytest.raises(UserError, match=message):
        load_spec(REPO / "jobs" / "tiny-local.yaml", ["k8s.runtime_ref=torch-distributed", *extra])


def test_qlora_under_trainer_v2_is_one_node_and_unqueued_without_a_queue():
    spec = example("qlora-1node")
    train_job = by_component(k8s.render(spec, ["train"]))["train"]
    assert train_job["spec"]["trainer"]["numNodes"] == 1 and train_job["spec"]["trainer"]["numProcPerNode"] == 4
    assert "suspend" not in train_job["spec"] and "kueue.x-k8s.io/queue-name" not in train_job["metadata"]["labels"]


def test_multinode_lora_is_master_plus_workers_with_the_run_on_the_volume():
    spec = example("lora-multinode-v1")
    job = by_component(k8s.render(spec, ALL))["train"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == spec.resources.nodes - 1 == 1
    assert job["metadata"]["name"] == "lora-13b-multinode-train"
    pod = replicas["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["train", "--run-dir", "/shared/runs/lora-13b-multinode", "--spec", "/etc/llava-cluster/spec.yaml"]
    assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "llava-shared"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert c["resources"]["requests"] == {"cpu": "8"}  # mem "0" (whole node, SLURM's sense): no request
    env = {e["name"]: e for e in c["env"]}
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}


def test_single_node_lora_has_no_workers_and_no_token_without_a_secret():
    spec = tiny_spec(api="pytorchjob")
    spec.resources.nodes = 1
    spec.resources.mem = "900G"
    job = by_component(k8s.render(spec, ["train"]))["train"]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    (c,) = pod_templates(job)[0]["spec"]["containers"]
    assert "HF_TOKEN" not in {e["name"] for e in c["env"]}
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "900Gi"}
    validate(job)


def test_only_the_requested_stages_are_rendered():
    spec = tiny_spec()
    assert [d["metadata"]["name"] for d in k8s.render(spec, ["validate"])] == ["tiny-local-spec", "tiny-local-validate"]
    with pytest.raises(UserError, match="unknown stage"):
        k8s.render(spec, ["train", "evaluate"])


@pytest.mark.parametrize("run, expected", [
    ("tiny-local", "tiny-local-train"),
    ("7b.v1.5", "r-7b-v1-5-train"),
    ("a" * 52, "a" * 40 + "-train"),
])
def test_names_are_dns_1035_and_leave_room_for_pod_suffixes(run, expected):
    assert k8s.k8s_name(run, "train") == expected


def test_paths_off_the_volume_are_refused_for_submit_and_warned_in_dry_run(capsys):
    spec = tiny_spec()
    spec.data.train = "/home/me/train.json"
    spec.storage = "/scratch"
    assert k8s.paths_outside_mount(spec) == ["storage: /scratch", "data.train: /home/me/train.json"]
    with pytest.raises(UserError, match=r"not under k8s.mount_path=/shared") as err:
        k8s.submit(spec, ALL, dry_run=False)
    assert "data.train: /home/me/train.json" in err.value.message
    assert k8s.submit(spec, ALL, dry_run=True) == 0
    out, errout = capsys.readouterr()
    assert "warning" in errout and "storage: /scratch" in errout
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["ConfigMap", "TrainingRuntime", "TrainJob", "Job", "Job"]


def test_dry_run_prints_exactly_the_rendered_manifests(capsys):
    spec = example("qlora-1node")
    assert k8s.submit(spec, ALL, dry_run=True) == 0
    out = capsys.readouterr().out
    assert list(yaml.safe_load_all(out)) == k8s.render(spec, ALL)
    assert "&id" not in out  # written out in full, no YAML anchors


def _fake_kubectl(bin_dir: Path, existing: str = "", apply_rc: int = 0) -> Path:
    """A stand-in kubectl (no cluster here) that records its calls and stdin."""
    log = bin_dir / "calls.jsonl"
    script = bin_dir / "kubectl"
    script.write_text(f"""#!{sys.executable}
import json, sys
stdin = sys.stdin.read() if sys.argv[1] == "apply" else ""
open({str(log)!r}, "a").write(json.dumps({{"argv": sys.argv[1:], "stdin": stdin}}) + "\\n")
if sys.argv[1] == "get":
    print({existing!r})
elif {apply_rc}:
    print("error: the server does not allow this", file=sys.stderr)
    sys.exit({apply_rc})
else:
    print("configmap/tiny-local-spec created")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def test_submit_checks_for_earlier_jobs_then_applies_all_manifests(tmp_path, monkeypatch):
    log = _fake_kubectl(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    spec = tiny_spec(namespace="ml")
    assert k8s.submit(spec, ALL, dry_run=False) == 0
    get, apply = [json.loads(line) for line in log.read_text().splitlines()]
    # the TrainingRuntime is configuration that apply updates; the workloads must not exist yet
    assert get["argv"] == ["get", "-n", "ml", "--ignore-not-found", "-o", "name", "trainjob/tiny-local-train",
                           "job/tiny-local-merge", "job/tiny-local-validate"]
    assert apply["argv"] == ["apply", "-f", "-"]
    assert list(yaml.safe_load_all(apply["stdin"])) == k8s.render(spec, ALL)


def test_submit_under_pytorchjob_checks_for_the_pytorchjob(tmp_path, monkeypatch):
    log = _fake_kubectl(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert k8s.submit(tiny_spec(api="pytorchjob"), ["train"], dry_run=False) == 0
    get = json.loads(log.read_text().splitlines()[0])
    assert get["argv"][-1] == "pytorchjob/tiny-local-train"


def test_strict_crd_validation_refuses_a_misspelt_trainjob_field():
    """The offline check is worth something only if it refuses what the API server would."""
    docs = k8s.render(tiny_spec(), ["train"])
    train_job = by_component(docs)["train"]
    train_job["spec"]["trainer"]["numProcsPerNode"] = 1
    with pytest.raises(AssertionError, match="numProcsPerNode"):
        validate(train_job)
    runtime = runtime_of(docs, train_job)
    pod_templates(runtime)[0]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(AssertionError, match="runAsNonroot"):
        validate(runtime)


def test_submit_refuses_when_jobs_of_an_earlier_submission_exist(tmp_path, monkeypatch):
    log = _fake_kubectl(tmp_path, existing="job.batch/tiny-local-merge")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(UserError, match=r"kubectl delete -n default job.batch/tiny-local-merge"):
        k8s.submit(tiny_spec(), ["merge", "validate"], dry_run=False)
    assert len(log.read_text().splitlines()) == 1  # nothing applied


def test_submit_reports_a_failed_apply(tmp_path, monkeypatch):
    _fake_kubectl(tmp_path, apply_rc=1)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(UserError, match=r"kubectl apply failed(.|\n)*does not allow this"):
        k8s.submit(tiny_spec(), ALL, dry_run=False)


def test_submit_without_kubectl_or_without_a_cluster_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="kubectl not found on PATH"):
        k8s.submit(tiny_spec(), ALL, dry_run=False)
    real = subprocess.run(["bash", "-c", "command -v kubectl"], capture_output=True, text=True,
                          env={"PATH": os.defpath + ":/usr/bin:/usr/local/bin"}).stdout.strip()
    if not real:
        pytest.skip("no real kubectl on this machine")
    (tmp_path / "kubectl").symlink_to(real)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="kubectl get .* failed"):
        k8s.submit(tiny_spec(), ALL, dry_run=False)


# ---- hostile spec values ------------------------------------------------------------------------------

HOSTILE = "$(touch PWNED) `id`; it's \"quoted\" [a-z0-9] && x"


@pytest.mark.parametrize("api", ["trainer-v2", "pytorchjob"])
def test_shell_syntax_in_legal_values_reaches_the_pods_as_plain_data(capsys, api):
    """Env values and paths full of shell syntax: every manifest value round-trips exactly, container
    commands are argument lists, and the dry-run warning keeps the text (rich markup included)."""
    spec = spec_from_dict({**tiny_spec(api=api).to_dict(), "env": {"NCCL_DEBUG": HOSTILE},
                           "storage": f"/shared/store {HOSTILE}"})
    docs = k8s.render(spec, ALL)
    reloaded = list(yaml.safe_load_all(k8s.to_yaml(docs)))
    assert reloaded == docs
    # Trainer v2: the TrainJob's trainer gives the runtime's `node` container its arguments
    trainer = next((d["spec"]["trainer"] for d in reloaded if d["kind"] == "TrainJob"), None)
    for doc in reloaded:
        for template in pod_templates(doc):
            for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                args = trainer["args"] if doc["kind"] == "TrainingRuntime" else c["args"]
                assert "command" not in c and all(isinstance(a, str) for a in args)
                assert str(spec.run_dir) in args
                assert {"name": "NCCL_DEBUG", "value": HOSTILE} in c["env"]
    assert trainer is None or "command" not in trainer
    assert spec_from_dict(yaml.safe_load(reloaded[0]["data"]["spec.yaml"])).env == {"NCCL_DEBUG": HOSTILE}
    spec.data.train = f"/home/{HOSTILE}"
    assert k8s.submit(spec, ALL, dry_run=True) == 0
    assert f"data.train: /home/{HOSTILE}" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("namespace", "ns;touch PWNED"), ("claim", "$(x)"),
                                          ("service_account", "a b"), ("hub_token_secret", "tok\nx"),
                                          ("queue", "Team A"), ("priority_class", "high;x"), ("api", "mpijob"),
                                          ("gang", "slurm")])
def test_names_that_kubernetes_would_not_take_are_refused_at_load(field, value):
    with pytest.raises(UserError, match=f"k8s.{field}"):
        spec_from_dict({**tiny_spec().to_dict(), "k8s": {field: value}})
