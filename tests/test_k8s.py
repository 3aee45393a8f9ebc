"""`launcher k8s`: the manifest it writes, loaded with Kubeflow's own API models.

What is checked:
  a. every document loads with the kubeflow-training SDK's OpenAPI models (the PyTorchJob's, and
     the Kubernetes models it re-exports for the ConfigMap and the pod template), and writing the
     loaded object back gives the document unchanged: the SDK's loader silently drops keys it does not
     know and coerces values (int("8"), str(8)), so the round trip is what catches a misspelled key
     or a value of the wrong type; the negative test injects both;
  b. the rules of the training-operator's admission webhook and controller that the models do not
     encode (a Worker replica spec, a container named pytorch with the port named pytorchjob-port,
     a DNS-1035 name, a known restart policy);
  c. the pods' command parses with launcher's own `run` parser and passes its launch checks, and names
     the same rendezvous (host, port, id, node range, restarts, workers) as the elasticPolicy;
  d. the embedded config is the resolved config (with the run dir on the shared claim);
  e. with checkpoints in object storage no claim is needed, and the pods get credentials from Secrets
     (envFrom), never written into the manifest;
  f. bad input is exit 2, with nothing written.
No cluster is needed: this is the manifest, not a run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, digits_config, write_config

MODELS = {("kubeflow.org/v1", "PyTorchJob"): "KubeflowOrgV1PyTorchJob", ("v1", "ConfigMap"): "V1ConfigMap"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
# 48 splits at every world size from 1 to 4 (nodes x 1 worker): micro 4, accumulation 12, 6, 4 or 3.
TRAIN = {"global_batch_size": 48, "micro_batch_size": 4, "max_steps": 20, "log_every_steps": 1, "seed": 0}


class SchemaError(AssertionError):
    pass


class Response:
    """What the SDK's ApiClient.deserialize reads: a body in .data."""

    def __init__(self, data: dict):
        self.data = json.dumps(data)


def differences(given, back, path: str = "") -> list[str]:
    """Where `back` (the document written back from the model) differs from `given`."""
    if isinstance(given, dict) and isinstance(back, dict):
        out = [f"{path}.{k}: not in the schema (dropped)" for k in given if k not in back]
        out += [f"{path}.{k}: added by the model" for k in back if k not in given]
        for k in given.keys() & back.keys():
            out += differences(given[k], back[k], f"{path}.{k}")
        return out
    if isinstance(given, list) and isinstance(back, list) and len(given) == len(back):
        return [d for i, (g, b) in enumerate(zip(given, back)) for d in differences(g, b, f"{path}[{i}]")]
    if type(given) is not type(back) or given != back:
        return [f"{path}: {given!r} ({type(given).__name__}) does not fit the schema (read as {back!r})"]
    return []


def kubeflow_load(doc: dict):
    """Load one manifest document with Kubeflow's models; raise SchemaError unless it round-trips unchanged."""
    try:
        from kubeflow.training import ApiClient
    except ImportError:
        pytest.fail("kubeflow-training is not installed: pip install -e '.[dev]' (it holds the PyTorchJob's models)")
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in MODELS:
        raise SchemaError(f"unknown apiVersion/kind {key}: expected one of {sorted(MODELS)}")
    with ApiClient() as client:
        try:
            obj = client.deserialize(Response(doc), MODELS[key])
        except (ValueError, TypeError) as e:  # int("two"), a required field missing
            raise SchemaError(f"{doc['kind']}: {e}") from None
        problems = differences(doc, client.sanitize_for_serialization(obj), doc["kind"])
    if problems:
        raise SchemaError("; ".join(sorted(problems)))
    return obj


def operator_rules(job: dict) -> None:
    """What the training-operator's webhook and controller require beyond the OpenAPI schema."""
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Worker"}, "elastic: Workers only (a Master would set RANK, WORLD_SIZE)"
    worker = replicas["Worker"]
    assert worker["restartPolicy"] in RESTART_POLICIES
    assert worker["replicas"] >= 1
    containers = {c["name"]: c for c in worker["template"]["spec"]["containers"]}
    assert "pytorch" in containers
    ports = {p["name"]: p["containerPort"] for p in containers["pytorch"].get("ports", [])}
    assert "pytorchjob-port" in ports
    if "elasticPolicy" in job["spec"]:
        assert "nProcPerNode" not in job["spec"]["elasticPolicy"], "deprecated, and refused with spec.nprocPerNode"


def write_manifest(tmp_path: Path, monkeypatch, argv: list) -> tuple[int, list[dict], Path]:
    """Run `launcher k8s` in-process in tmp_path; return its exit code and the documents it wrote."""
    from launcher.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job.yaml"
    code = main(["k8s", *map(str, argv), "--out", str(out)])
    docs = list(yaml.safe_load_all(out.read_text())) if out.exists() else []
    return code, docs, out


def parts(docs: list[dict]) -> tuple[dict, dict, dict]:
    """(ConfigMap, PyTorchJob, the training container)."""
    config_map, job = docs
    return config_map, job, job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


def digits(tmp_path: Path, **train) -> Path:
    """A small digits config, its run dir tmp_path/runs/Digits_K8s; keyword arguments change train:."""
    return write_config(tmp_path / "c.yaml", digits_config(tmp_path / "runs" / "Digits_K8s", train={**TRAIN, **train}))


# ---------------------------------------------------------------- the schema


CASES = {
    "gpt_ddp elastic, CPU": lambda tmp: [ROOT / "configs" / "gpt_ddp.yaml", "--nodes", "1:2", "--image", "x/l:1",
                                         "--pvc", "runs"],
    "digits elastic, GPUs, claim": lambda tmp: [
        digits(tmp), "--nodes", "2:4", "--image", "x/l:1", "--gpus-per-node", 4, "--nproc-per-node", 1,
        "--pvc", "train-runs", "--namespace", "ml", "--cpu", "8", "--memory", "32Gi",
        "--env", "NCCL_SOCKET_IFNAME=eth0"],
    "digits fixed, 2 nodes": lambda tmp: [digits(tmp), "--nodes", "2", "--image", "x/l:1", "--pvc", "runs"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_manifest_loads_with_kubeflows_models(tmp_path, monkeypatch, case):
    from kubeflow.training.models import KubeflowOrgV1PyTorchJob, V1ConfigMap

    code, docs, out = write_manifest(tmp_path, monkeypatch, CASES[case](tmp_path))
    assert code == 0
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    config_map, job = (kubeflow_load(d) for d in docs)
    assert isinstance(config_map, V1ConfigMap) and isinstance(job, KubeflowOrgV1PyTorchJob)
    operator_rules(docs[1])
    volumes = {v.name: v for v in job.spec.pytorch_replica_specs["Worker"].template.spec.volumes}
    assert volumes["config"].config_map.name == config_map.metadata.name
    assert out.read_text().startswith("# Written by `launcher k8s`")


def test_the_schema_check_catches_a_misspelled_key_and_a_wrong_type(tmp_path, monkeypatch):
    code, docs, _ = write_manifest(tmp_path, monkeypatch, CASES["digits elastic, GPUs, claim"](tmp_path))
    assert code == 0
    job = docs[1]
    kubeflow_load(job)  # as written: fine

    def broken(change) -> dict:
        copy = json.loads(json.dumps(job))
        change(copy)
        return copy

    def container(doc):
        return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]

    def misspell(doc):  # minReplicas -> minReplica
        doc["spec"]["elasticPolicy"]["minReplica"] = doc["spec"]["elasticPolicy"].pop("minReplicas")

    with pytest.raises(SchemaError, match=r"elasticPolicy\.minReplica: not in the schema"):
        kubeflow_load(broken(misspell))
    with pytest.raises(SchemaError, match=r"containers\[0\]\.volumeMount: not in the schema"):
        kubeflow_load(broken(lambda d: container(d).update(volumeMount=container(d).pop("volumeMounts"))))
    with pytest.raises(SchemaError, match=r"containerPort: '29400' \(str\) does not fit"):
        kubeflow_load(broken(lambda d: container(d)["ports"][0].update(containerPort="29400")))
    with pytest.raises(SchemaError, match=r"nvidia.com/gpu: 4 \(int\) does not fit"):
        kubeflow_load(broken(lambda d: container(d)["resources"]["limits"].update({"nvidia.com/gpu": 4})))
    with pytest.raises(SchemaError, match="invalid literal for int"):
        kubeflow_load(broken(lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two")))
    with pytest.raises(SchemaError, match="unknown apiVersion/kind"):
        kubeflow_load(broken(lambda d: d.update(kind="PytorchJob")))


# ---------------------------------------------------------------- what the pods run


def parse_run(command: list[str], env: dict[str, str] | None = None):
    """The pod's command through launcher's own `run` parser and launch checks ($(VAR) as Kubernetes expands it)."""
    from launcher.cli import parser
    from launcher.env import detect
    from launcher.preflight import check_node_launch

    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in command]
    assert argv[1:4] == ["-m", "launcher", "run"]
    args = parser()[1]["run"].parse_intermixed_args(argv[4:])
    check_node_launch(args, detect())
    return args


def test_the_pods_command_and_the_elastic_policy_name_one_rendezvous(tmp_path, monkeypatch):
    code, docs, _ = write_manifest(tmp_path, monkeypatch, CASES["digits elastic, GPUs, claim"](tmp_path))
    assert code == 0
    _, job, container = parts(docs)
    policy, name = job["spec"]["elasticPolicy"], job["metadata"]["name"]
    args = parse_run(container["command"])
    assert args.config == "/etc/launcher/config.yaml" and args.overrides == []
    assert args.elastic and (args.min_nodes, args.max_nodes) == (policy["minReplicas"], policy["maxReplicas"]) == (2, 4)
    assert args.node_rank is None  # every pod runs the same command
    # The operator's PET_RDZV_ENDPOINT is rdzvHost:rdzvPort; its default host is NAME-worker-0, a pod's hostname.
    assert args.rdzv_endpoint == f"{policy['rdzvHost']}:{policy['rdzvPort']}" == f"{name}-worker-0:29400"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["pytorchjob-port"] == policy["rdzvPort"]
    assert args.rdzv_id == policy["rdzvId"] == name and policy["rdzvBackend"] == "c10d"
    assert args.max_restarts == policy["maxRestarts"]
    assert str(args.nproc) == job["spec"]["nprocPerNode"] == "1"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == policy["maxReplicas"]
    assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == policy["minReplicas"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "4"}, "requests": {"cpu": "8", "memory": "32Gi"}}
    assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in container["env"]
    assert all(not e["name"].startswith("PET_") and e["name"] not in ("RANK", "WORLD_SIZE") for e in container["env"])


def test_a_fixed_size_job_takes_each_pods_rank_from_the_operators_label(tmp_path, monkeypatch):
    code, docs, _ = write_manifest(tmp_path, monkeypatch, CASES["digits fixed, 2 nodes"](tmp_path))
    assert code == 0
    _, job, container = parts(docs)
    assert "elasticPolicy" not in job["spec"]
    rank_var = next(e for e in container["env"] if e["name"] == "LAUNCHER_NODE_RANK")
    assert rank_var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['training.kubeflow.org/replica-index']"
    for rank in ("0", "1"):
        args = parse_run(container["command"], {"LAUNCHER_NODE_RANK": rank})
        assert not args.elastic and args.nnodes == 2 and args.node_rank == int(rank)
        assert args.rdzv_endpoint == f"{job['metadata']['name']}-worker-0:29400"
    code, docs, _ = write_manifest(tmp_path, monkeypatch, [digits(tmp_path), "--nodes", "1", "--image", "x"])
    command = parts(docs)[2]["command"]
    args = parse_run(command)
    assert code == 0 and "--nnodes" not in command and args.nnodes == 1 and args.rdzv_endpoint is None


def test_the_embedded_config_is_the_resolved_config_with_the_run_dir_on_the_claim(tmp_path, monkeypatch, capsys):
    from launcher.config import load_config

    cfg_path = digits(tmp_path)
    code, docs, _ = write_manifest(tmp_path, monkeypatch, [cfg_path, "optim.lr=0.01", "--nodes", "1:2", "--image", "x",
                                                           "--pvc", "runs", "--mount", "/mnt/shared"])
    assert code == 0
    config_map, job, container = parts(docs)
    (tmp_path / "embedded.yaml").write_text(config_map["data"]["config.yaml"])
    embedded = load_config(tmp_path / "embedded.yaml").to_dict()
    resolved = load_config(cfg_path, ["optim.lr=0.01"]).to_dict()
    assert embedded["optim"]["lr"] == 0.01
    assert embedded == {**resolved, "run_dir": "/mnt/shared/Digits_K8s"}
    saved = tmp_path / "runs" / "Digits_K8s" / "k8s" / "config.yaml"
    assert saved.read_text() == config_map["data"]["config.yaml"]
    assert {"name": "run-dir", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    claim = {v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"]}
    assert claim["run-dir"]["persistentVolumeClaim"] == {"claimName": "runs"}
    assert job["metadata"]["name"] == "digits-k8s"
    assert "warning" not in capsys.readouterr().err


def test_without_a_claim_it_warns_that_checkpoints_do_not_survive_a_pod(tmp_path, monkeypatch, capsys):
    """A fixed-size job is warned; an elastic one, which resumes at every resize, is refused (a bad input below)."""
    code, docs, out = write_manifest(tmp_path, monkeypatch, [digits(tmp_path), "--nodes", "2", "--image", "x"])
    assert code == 0
    assert "warning: no --pvc" in capsys.readouterr().err
    assert "# WARNING: no --pvc" in out.read_text()
    assert all("persistentVolumeClaim" not in v
               for v in docs[1]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"])


# ---------------------------------------------------------------- checkpoints in object storage


BUCKET = "s3://train-bucket/digits"


def test_checkpoints_in_a_bucket_run_an_elastic_job_without_a_claim(tmp_path, monkeypatch, capsys):
    from launcher.config import load_config

    # The submitting shell's own credentials must not leak into what the pods read from the ConfigMap.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-write-me")
    code, docs, out = write_manifest(tmp_path, monkeypatch, [
        digits(tmp_path), f"checkpoint.dir={BUCKET}", "--nodes", "1:2", "--image", "x",
        "--env-from-secret", "s3-credentials", "--env-from-secret", "wandb.key", "--env-from-secret", "s3-credentials"])
    assert code == 0
    kubeflow_load(docs[1])  # envFrom as written is the schema's
    operator_rules(docs[1])
    config_map, job, _ = parts(docs)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert [v["name"] for v in pod["volumes"]] == ["config", "dshm"]  # no claim
        for container in pod["containers"]:
            assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}},
                                            {"secretRef": {"name": "wandb.key"}}]
            assert [m["mountPath"] for m in container["volumeMounts"]] == ["/etc/launcher", "/dev/shm"]
            args = parse_run(container["command"])
            assert args.elastic and (args.min_nodes, args.max_nodes) == (1, 2)
    (tmp_path / "embedded.yaml").write_text(config_map["data"]["config.yaml"])
    embedded = load_config(tmp_path / "embedded.yaml")
    assert embedded.checkpoint.dir == BUCKET
    assert embedded.run_dir == load_config(tmp_path / "c.yaml").run_dir  # each pod's own, not moved to a mount
    text = out.read_text()
    assert "do-not-write-me" not in text
    assert "do-not-write-me" not in (tmp_path / "runs" / "Digits_K8s" / "k8s" / "config.yaml").read_text()
    assert f"# Checkpoints: {BUCKET}, shared by every pod" in text
    assert "# Run dir: " in text and "on each pod's own disk (no --pvc)" in text and "WARNING" not in text
    assert "# Environment from the Secret(s) s3-credentials, wandb.key (envFrom), not written here." in text
    err = capsys.readouterr().err
    assert "warning: no --pvc: each pod keeps its own run dir" in err and f"checkpoints go to {BUCKET}" in err
    assert "no --env-from-secret" not in err


def test_a_bucket_without_a_secret_warns_about_credentials_and_keeps_the_claim(tmp_path, monkeypatch, capsys):
    """No Secret is no error (an IAM role or workload identity may give the credentials); with a claim the run
    dir stays on it while the checkpoints go to the bucket."""
    code, docs, out = write_manifest(tmp_path, monkeypatch, [digits(tmp_path), f"checkpoint.dir={BUCKET}",
                                                           "--nodes", "2", "--image", "x", "--pvc", "runs"])
    assert code == 0
    _, job, container = parts(docs)
    assert "envFrom" not in container
    assert {"name": "run-dir", "mountPath": "/shared"} in container["volumeMounts"]
    err = capsys.readouterr().err
    assert f"warning: checkpoint.dir is {BUCKET} and no --env-from-secret" in err
    assert "no --pvc" not in err
    text = out.read_text()
    assert "# Run dir: /shared/Digits_K8s on the PersistentVolumeClaim runs" in text
    assert f"# Checkpoints: {BUCKET}, shared by every pod" in text


def test_an_elastic_job_with_local_checkpoints_and_no_claim_is_refused(tmp_path, monkeypatch, capsys):
    code, docs, _ = write_manifest(tmp_path, monkeypatch, [digits(tmp_path), "checkpoint.dir=/data/ckpt",
                                                           "--nodes", "1:2", "--image", "x"])
    err = capsys.readouterr().err
    assert code == 2 and docs == [] and not list(tmp_path.rglob("k8s"))
    assert "--nodes 1:2 without --pvc" in err and "checkpoint.dir (/data/ckpt) would be on each pod's own disk" in err
    assert "set checkpoint.dir to object storage (checkpoint.dir=s3://bucket/prefix)" in err
    assert "--env-from-secret NAME" in err


# ---------------------------------------------------------------- bad input


BAD = {
    "--nodes 3:2": ([], ["--nodes", "3:2"], "--nodes 3:2: give a number of nodes N (at least 1), or MIN:MAX"),
    "deepspeed, elastic": ([ROOT / "configs" / "gpt_zero2.yaml"], ["--nodes", "1:2"],
                           "strategy=deepspeed cannot run elastic"),
    "a batch that does not split at 3": ([], ["--nodes", "1:3"],
                                         "global_batch_size=64 cannot be split evenly at world size 3"),
    "no GPUs": ([], ["--nodes", "1:2", "--gpus-per-node", 0], "--gpus-per-node 0: it must be at least 1"),
    "more workers than GPUs": ([], ["--nodes", "1:2", "--gpus-per-node", 2, "--nproc-per-node", 3],
                               "--nproc-per-node 3 is more than --gpus-per-node 2"),
    "a name that is no DNS label": ([], ["--nodes", "1:2", "--name", "My_Job"], "--name My_Job: the pods are named"),
    "a rank variable": ([], ["--nodes", "1:2", "--env", "RANK=0"], "--env RANK: the manifest and the"),
    "a claim name": ([], ["--nodes", "1:2", "--pvc", "Runs!"], "--pvc Runs!: not a PersistentVolumeClaim name"),
    "a relative mount": ([], ["--nodes", "1:2", "--pvc", "r", "--mount", "shared"], "--mount shared: give an absolute"),
    "elastic without a claim": ([], ["--nodes", "1:2", "--pvc", None],
                                "--nodes 1:2 without --pvc: every resize resumes from the newest checkpoint, which "
                                "every pod must reach, and checkpoint.dir (RUN_DIR/checkpoints)"),
    "a secret name": ([], ["--nodes", "1:2", "--env-from-secret", "aws_creds"],
                      "--env-from-secret aws_creds: not a Secret name"),
    "a secret name too long": ([], ["--nodes", "1:2", "--env-from-secret", "a" * 254],
                               f"--env-from-secret {'a' * 254}: not a Secret name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    config, options, message = BAD[case]
    if None in options:  # the case is the missing claim
        options = [o for o in options if o not in ("--pvc", None)]
    elif "--pvc" not in options:  # an elastic job needs one
        options = options + ["--pvc", "r"]
    config = config or [digits(tmp_path, global_batch_size=64, micro_batch_size=32)]  # 64 splits at 1 and 2, not 3
    code, docs, _ = write_manifest(tmp_path, monkeypatch, [*config, "--image", "x", *options])
    assert code == 2 and docs == []
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("k8s"))


def test_the_default_name_is_a_dns_label_that_fits():
    from launcher.k8s import check_name, default_name

    assert default_name("GPT_small", 4) == "gpt-small" and default_name("2024_run", 2) == "run"
    assert default_name("___", 2) == "launcher"
    long = default_name("a" * 80, 100)
    check_name(long, 100, given=False)
    assert len(f"{long}-worker-99") == 63


def test_launcher_help_lists_k8s():
    from launcher.cli import EPILOG, parser

    top, commands = parser()
    assert "k8s" in commands and "launcher k8s" in EPILOG
    assert "k8s" in top.format_help()
