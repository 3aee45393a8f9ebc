"""launcher k8s: write a Kubernetes manifest that trains a config as an elastic job.

`launcher k8s CONFIG [key=value ...] --nodes MIN:MAX --image IMAGE [--pvc CLAIM] [--env-from-secret NAME]`
checks the config for every world size from MIN x P to MAX x P workers (as `launcher run --nnodes
MIN:MAX` would), saves the config the pods run as RUN_DIR/k8s/config.yaml and writes RUN_DIR/k8s/job.yaml (or --out),
two YAML documents, and prints them:

  - a ConfigMap NAME-config holding that config, mounted read-only into every pod at CONFIG_DIR, so
    that editing the YAML later cannot change a job that was already applied;
  - a Kubeflow PyTorchJob NAME (training-operator, kubeflow.org/v1): MAX Worker pods, no Master, each
    running `python -m launcher run CONFIG_DIR/config.yaml --nproc P --nnodes MIN:MAX --rdzv-endpoint
    NAME-worker-0:PORT --rdzv-id NAME`, the same command in every pod.

Why a PyTorchJob and not Kubeflow Trainer v2's TrainJob. A TrainJob asks for `numNodes`, one fixed
number: Trainer v2 has no node range today. Its runtime API declares a torch `elasticPolicy`
(minNodes, maxNodes), but the controller does not act on it (elastic TrainJobs are still an open
enhancement proposal), the torch plugin sets PET_NNODES to numNodes, and `spec.trainer` cannot be
changed once the job exists. The training-operator's PyTorchJob has run elastic jobs for years:
`elasticPolicy` with minReplicas / maxReplicas and the c10d rendezvous. A TrainJob also needs a
(Cluster)TrainingRuntime installed by an administrator; a PyTorchJob needs only the operator.

What the operator does with an elastic PyTorchJob, and how this manifest agrees with it. It
creates one pod and one headless service per Worker, both named NAME-worker-I, and sets in every
pod the PET_* variables torchrun reads as defaults: PET_RDZV_ENDPOINT (elasticPolicy's rdzvHost,
by default NAME-worker-0, and rdzvPort, by default the container's port named "pytorchjob-port"),
PET_RDZV_BACKEND, PET_NNODES (minReplicas:maxReplicas), PET_RDZV_ID, PET_MAX_RESTARTS. The manifest
sets each of these explicitly to what the pod's command passes (rdzvHost NAME-worker-0, rdzvPort =
the container's pytorchjob-port = PORT, rdzvId NAME), so the command and the operator's variables
name the same rendezvous. The pod named NAME-worker-0 hosts it: torchrun's c10d backend serves the
rendezvous store on the machine whose hostname is the endpoint's host, and a pod's hostname is its
name. Without a Master replica the operator sets no RANK / WORLD_SIZE / MASTER_ADDR, which `launcher
run --nproc` would take for a torchrun worker's and refuse.

Pods come and go. The Worker pods restart on failure (restartPolicy OnFailure; runPolicy's
backoffLimit bounds the restarts of all pods together), and the operator recreates a pod that was
deleted or evicted: either way it runs the same command again and joins the next rendezvous, and the
job grows back. The job starts once MIN pods have met and may run on fewer than MAX while the others
wait for room (gang schedulers get minAvailable = MIN). Every restart resumes from the newest
checkpoint, so every pod must reach the checkpoints, which must outlive the pods: either every pod
mounts the run dir from one PersistentVolumeClaim (--pvc), or checkpoint.dir is object storage
(s3://bucket/prefix), whose credentials the pods get from Secrets (--env-from-secret, as envFrom:
the manifest names the Secret, never its values) or from the cluster (an IAM role, workload
identity). Without a claim each pod keeps its own run dir on its own disk, lost with its container:
only the pod running rank 0 writes there (metrics.jsonl, tb/, wandb/). An elastic job with neither
is refused; a fixed-size one is warned about.

MIN == MAX, a fixed number of nodes. `launcher run --nnodes N` (N:N as well) uses torchrun's static
rendezvous, which needs each node's rank. The pod's rank comes from the operator's label
training.kubeflow.org/replica-index through the downward API (env LAUNCHER_NODE_RANK), so the pods'
command is still one text: `... --nnodes N --node-rank $(LAUNCHER_NODE_RANK) --rdzv-endpoint
NAME-worker-0:PORT`, with no elasticPolicy. One node needs no rendezvous: `launcher run --nproc P`.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from .config import ConfigError, dump_config, load_config
from .fs import replaced_atomically, say, warn
from .storage import is_url

CONFIG_DIR = "/etc/launcher"         # where the ConfigMap is mounted in the pods
CONTAINER = "pytorch"                # the operator finds the training container by this name ...
PORT_NAME = "pytorchjob-port"        # ... and the rendezvous port by this one
INDEX_LABEL = "training.kubeflow.org/replica-index"  # the operator's label: a Worker pod's index
NODE_RANK_VAR = "LAUNCHER_NODE_RANK"
DEFAULT_PORT = 29400                 # torchrun's own default for the c10d rendezvous
DEFAULT_MOUNT = "/shared"
# Seconds a deleted or evicted pod has between SIGTERM and SIGKILL: time for the workers to finish
# the step and save a checkpoint (launcher saves on SIGTERM and exits 3).
DEFAULT_GRACE_S = 180
CONFIGMAP_MAX_BYTES = 1024 * 1024    # Kubernetes' limit on a ConfigMap's data
NAME_MAX = 63                        # a DNS label: pod hostnames and service names
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?([eE][0-9]+|[kKMGTPE]i?|m)?")
# Set by the manifest itself, or making `launcher run --nproc` take the pod for a torchrun worker.
RESERVED_ENV = {NODE_RANK_VAR, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `launcher k8s` (CONFIG and the overrides are added by the CLI)."""
    p.add_argument("--nodes", required=True, metavar="MIN:MAX",
                   help="pods (nodes) the job runs on: MIN:MAX for an elastic job, or N for a fixed number")
    p.add_argument("--image", required=True, help="a container image holding this project and its dependencies")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs each pod asks for (G); leave out for CPU-only pods")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="workers per pod (P): default G, or 1 without --gpus-per-node")
    p.add_argument("--pvc", default=None, metavar="CLAIM",
                   help="a PersistentVolumeClaim every pod mounts (ReadWriteMany across nodes); the run dir lives "
                        "on it, so checkpoints survive a pod")
    p.add_argument("--mount", default=DEFAULT_MOUNT, metavar="PATH",
                   help=f"where the pods mount --pvc (default {DEFAULT_MOUNT}); the run dir is PATH/<run dir's name>")
    p.add_argument("--name", default=None, help="the job's name (default: from the run dir's name)")
    p.add_argument("--namespace", default=None, help="the namespace (default: kubectl's current one)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the rendezvous port (default {DEFAULT_PORT})")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="worker-group restarts inside a pod before its launcher gives up (default: launcher run's)")
    p.add_argument("--backoff-limit", type=int, default=None,
                   help="container restarts, all pods together, before the job is failed (default 3 x MAX, "
                        "at least 10)")
    p.add_argument("--grace-period", type=int, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help=f"time a deleted pod has to save a checkpoint (default {DEFAULT_GRACE_S})")
    p.add_argument("--gpu-resource", default="nvidia.com/gpu", help="the GPUs' resource name (default nvidia.com/gpu)")
    p.add_argument("--cpu", default=None, help="CPU cores each pod requests, e.g. 16")
    p.add_argument("--memory", default=None, help="memory each pod requests, e.g. 200Gi")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the pods, e.g. --env NCCL_SOCKET_IFNAME=eth0 (repeatable)")
    p.add_argument("--env-from-secret", action="append", default=[], metavar="NAME",
                   help="a Secret whose keys the pods get as environment variables, e.g. the credentials for an "
                        "s3:// checkpoint.dir (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; repeatable)")
    p.add_argument("--python", default="python", help="the interpreter in the image (default python)")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write the manifest (default "
                   "RUN_DIR/k8s/job.yaml)")


@dataclass(frozen=True)
class Job:
    """What the manifest says, once checked."""

    name: str
    image: str
    min_nodes: int
    max_nodes: int
    nproc: int
    port: int
    max_restarts: int
    backoff_limit: int
    grace_s: int
    python: str
    config_text: str
    run_dir: str                      # the run dir as the pods see it
    namespace: str | None = None
    gpus: int | None = None
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    pvc: str | None = None
    mount: str = DEFAULT_MOUNT
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()     # Secrets the container's envFrom names
    checkpoint_dir: str | None = None  # the config's checkpoint.dir (None: RUN_DIR/checkpoints)

    @property
    def elastic(self) -> bool:
        return self.min_nodes < self.max_nodes

    @property
    def in_bucket(self) -> bool:
        """Checkpoints in object storage, which every pod reaches without a claim."""
        return is_url(self.checkpoint_dir or "")

    @property
    def host(self) -> str:
        return f"{self.name}-worker-0"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"


def cmd_k8s(args) -> int:
    from .preflight import ELASTIC_RESTARTS, check_inputs, check_node_range, parse_nodes

    min_nodes, max_nodes = parse_nodes(args.nodes, "--nodes", ":")
    nproc = check_options(args)
    env = parse_env(args.env)
    cfg = load_config(args.config, args.overrides)
    if min_nodes < max_nodes and args.pvc is None and not is_url(cfg.checkpoint.dir or ""):
        raise ConfigError(f"--nodes {args.nodes} without --pvc: every resize resumes from the newest checkpoint, which "
                          f"every pod must reach, and checkpoint.dir ({cfg.checkpoint.dir or 'RUN_DIR/checkpoints'}) "
                          "would be on each pod's own disk. Give --pvc CLAIM (a PersistentVolumeClaim, ReadWriteMany "
                          "when the pods may run on different machines), or set checkpoint.dir to object storage "
                          "(checkpoint.dir=s3://bucket/prefix) and give the pods its credentials with "
                          "--env-from-secret NAME")
    check_node_range(cfg, nproc, min_nodes, max_nodes)
    check_inputs(cfg, max_nodes * nproc, args.config, elsewhere=True)

    run_dir = Path(cfg.run_dir).resolve()
    name = args.name or default_name(run_dir.name, max_nodes)
    check_name(name, max_nodes, given=args.name is not None)
    pod_run_dir = str(PurePosixPath(args.mount) / run_dir.name) if args.pvc else cfg.run_dir
    k8s_dir = run_dir / "k8s"
    k8s_dir.mkdir(parents=True, exist_ok=True)
    config_path = k8s_dir / "config.yaml"
    dump_config(cfg.model_copy(update={"run_dir": pod_run_dir}), config_path)
    config_text = config_path.read_text()
    if len(config_text.encode()) > CONFIGMAP_MAX_BYTES:
        raise ConfigError(f"the resolved config is {len(config_text.encode())} bytes, more than a ConfigMap holds "
                          f"({CONFIGMAP_MAX_BYTES}): move large values out of the config")
    default_restarts = ELASTIC_RESTARTS if min_nodes < max_nodes else 0
    job = Job(name=name, image=args.image, min_nodes=min_nodes, max_nodes=max_nodes, nproc=nproc, port=args.port,
              max_restarts=default_restarts if args.max_restarts is None else args.max_restarts,
              backoff_limit=args.backoff_limit if args.backoff_limit is not None else max(10, 3 * max_nodes),
              grace_s=args.grace_period, python=args.python, config_text=config_text, run_dir=pod_run_dir,
              namespace=args.namespace, gpus=args.gpus_per_node, gpu_resource=args.gpu_resource, cpu=args.cpu,
              memory=args.memory, pvc=args.pvc, mount=args.mount, env=env,
              secrets=tuple(dict.fromkeys(args.env_from_secret)), checkpoint_dir=cfg.checkpoint.dir)
    out = Path(args.out) if args.out else k8s_dir / "job.yaml"
    text = render(job, origin=" ".join([args.config, *args.overrides]), out=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out) as tmp:
        tmp.write_text(text)
    print(text, end="")
    report(job, cfg, out, config_path)
    return 0


def check_options(args) -> int:
    """The options that need no config; returns the workers per pod."""
    from .preflight import workers_per_node

    nproc = workers_per_node(args.gpus_per_node, args.nproc_per_node)
    if not args.image.strip() or re.search(r"\s", args.image):
        raise ConfigError(f"--image {args.image!r}: give an image reference without spaces, e.g. "
                          "registry.example.com/launcher:1.0")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: a TCP port is 1 to 65535 (default {DEFAULT_PORT})")
    for flag, value in (("--max-restarts", args.max_restarts), ("--backoff-limit", args.backoff_limit),
                        ("--grace-period", args.grace_period)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} {value}: it must be 0 or more")
    for flag, value in (("--cpu", args.cpu), ("--memory", args.memory)):
        if value is not None and not QUANTITY.fullmatch(value):
            raise ConfigError(f"{flag} {value}: not a Kubernetes quantity (e.g. --cpu 16 or 500m, --memory 200Gi)")
    if args.namespace is not None and not (DNS_1123.fullmatch(args.namespace) and len(args.namespace) <= NAME_MAX):
        raise ConfigError(f"--namespace {args.namespace}: a namespace is at most {NAME_MAX} lowercase letters, digits "
                          "and '-', starting and ending with a letter or digit")
    check_storage(args.pvc, args.mount)
    for secret in args.env_from_secret:
        if not object_name(secret):
            raise ConfigError(f"--env-from-secret {secret}: not a Secret name (lowercase letters, digits, '-' and "
                              "'.'); `kubectl get secrets` lists the Secrets of the namespace")
    return nproc


def object_name(name: str) -> bool:
    """A Kubernetes object name (a DNS-1123 subdomain), as claims and Secrets are named."""
    return len(name) <= 253 and all(DNS_1123.fullmatch(p) for p in name.split("."))


def check_storage(pvc: str | None, mount: str) -> None:
    if pvc is not None and not object_name(pvc):
        raise ConfigError(f"--pvc {pvc}: not a PersistentVolumeClaim name (lowercase letters, digits, '-' and '.'); "
                          "`kubectl get pvc` lists the claims of the namespace")
    path = PurePosixPath(mount)
    if not path.is_absolute() or path == PurePosixPath("/") or ".." in path.parts or \
            path in (PurePosixPath(CONFIG_DIR), PurePosixPath("/dev/shm")) or \
            PurePosixPath(CONFIG_DIR) in path.parents:
        raise ConfigError(f"--mount {mount}: give an absolute directory for the claim, other than /, {CONFIG_DIR} "
                          f"and /dev/shm (default {DEFAULT_MOUNT})")


def parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {item}: write KEY=VALUE, e.g. --env NCCL_SOCKET_IFNAME=eth0")
        if key in RESERVED_ENV or key.startswith("PET_"):
            raise ConfigError(f"--env {key}: the manifest and the training-operator set the rendezvous and rank "
                              f"variables ({', '.join(sorted(RESERVED_ENV))}, PET_*); with them set, `launcher run` "
                              "would take the pod for a worker started by torchrun. Drop it")
        env[key] = value
    return env


def default_name(run_dir_name: str, max_nodes: int) -> str:
    """A DNS-1035 label from the run dir's name (runs/GPT_small -> gpt-small), short enough for check_name."""
    name = re.sub(r"[^a-z0-9]+", "-", run_dir_name.lower())
    name = re.sub(r"^[^a-z]+", "", name)[:NAME_MAX - len(f"-worker-{max_nodes - 1}")].strip("-")
    return name or "launcher"


def check_name(name: str, max_nodes: int, given: bool) -> None:
    """The pods and services are NAME-worker-0 ... NAME-worker-(MAX-1): each a DNS label of at most 63."""
    longest = f"{name}-worker-{max_nodes - 1}"
    if DNS_1035.fullmatch(name) and len(longest) <= NAME_MAX:
        return
    room = NAME_MAX - len(f"-worker-{max_nodes - 1}")
    where = f"--name {name}" if given else f"the job's name {name} (from the run dir)"
    raise ConfigError(f"{where}: the pods are named {longest}, which must be a DNS label: lowercase letters, digits "
                      f"and '-', starting with a letter, at most {NAME_MAX} characters. Give --name with at most "
                      f"{room} such characters")


def pod_command(job: Job) -> list[str]:
    """The command of every pod: `launcher run` on the embedded config, joining the job's rendezvous."""
    command = [job.python, "-m", "launcher", "run", f"{CONFIG_DIR}/config.yaml", "--nproc", str(job.nproc)]
    if job.elastic:
        command += ["--nnodes", f"{job.min_nodes}:{job.max_nodes}", "--rdzv-endpoint", job.endpoint,
                    "--rdzv-id", job.name]
    elif job.max_nodes > 1:  # static: the rank from the operator's label, expanded by Kubernetes
        command += ["--nnodes", str(job.max_nodes), "--node-rank", f"$({NODE_RANK_VAR})",
                    "--rdzv-endpoint", job.endpoint]
    return command + ["--max-restarts", str(job.max_restarts)]


def manifest(job: Job) -> list[dict]:
    """The ConfigMap and the PyTorchJob, as plain data."""
    return [config_map(job), pytorch_job(job)]


def metadata(job: Job, name: str) -> dict:
    meta: dict = {"name": name}
    if job.namespace:
        meta["namespace"] = job.namespace
    meta["labels"] = {"app.kubernetes.io/name": "launcher", "app.kubernetes.io/instance": job.name}
    return meta


def config_map(job: Job) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(job, job.config_map),
            "data": {"config.yaml": job.config_text}}


def pytorch_job(job: Job) -> dict:
    spec: dict = {"nprocPerNode": str(job.nproc)}
    if job.elastic:
        spec["elasticPolicy"] = {"minReplicas": job.min_nodes, "maxReplicas": job.max_nodes, "rdzvBackend": "c10d",
                                 "rdzvHost": job.host, "rdzvPort": job.port, "rdzvId": job.name,
                                 "maxRestarts": job.max_restarts}
    run_policy: dict = {"backoffLimit": job.backoff_limit}
    if job.elastic:
        run_policy["schedulingPolicy"] = {"minAvailable": job.min_nodes}  # gang schedulers: start with MIN
    spec["runPolicy"] = run_policy
    spec["pytorchReplicaSpecs"] = {"Worker": {
        "replicas": job.max_nodes,
        "restartPolicy": "OnFailure",  # any failure: the container restarts and its pod joins again
        "template": {"metadata": {"labels": metadata(job, job.name)["labels"]}, "spec": pod_spec(job)},
    }}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": metadata(job, job.name), "spec": spec}


def pod_spec(job: Job) -> dict:
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "config", "configMap": {"name": job.config_map}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # data loader workers and NCCL need more than 64M
    if job.pvc:
        mounts.append({"name": "run-dir", "mountPath": job.mount})
        volumes.append({"name": "run-dir", "persistentVolumeClaim": {"claimName": job.pvc}})
    return {"terminationGracePeriodSeconds": job.grace_s, "containers": [container(job, mounts)], "volumes": volumes}


def container(job: Job, mounts: list[dict]) -> dict:
    env: list[dict] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if not job.elastic and job.max_nodes > 1:
        env.append({"name": NODE_RANK_VAR,
                    "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{INDEX_LABEL}']"}}})
    env += [{"name": key, "value": value} for key, value in job.env.items()]
    resources: dict = {}
    if job.gpus:
        resources["limits"] = {job.gpu_resource: str(job.gpus)}
    requests = {key: value for key, value in (("cpu", job.cpu), ("memory", job.memory)) if value is not None}
    if requests:
        resources["requests"] = requests
    spec = {"name": CONTAINER, "image": job.image, "command": pod_command(job), "env": env}
    if job.secrets:  # the Secret's keys become variables in the pod: the manifest holds only its name
        spec["envFrom"] = [{"secretRef": {"name": secret}} for secret in job.secrets]
    spec["ports"] = [{"name": PORT_NAME, "containerPort": job.port, "protocol": "TCP"}]
    if resources:
        spec["resources"] = resources
    spec["volumeMounts"] = mounts
    return spec


class Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the embedded config reads as YAML), no anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render(job: Job, origin: str, out: Path) -> str:
    """The manifest's text: a comment saying what it is and how to use it, then the documents."""
    docs = [yaml.dump(doc, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)
            for doc in manifest(job)]
    return "\n".join(header(job, origin, out)) + "\n" + "---\n".join(docs)


def header(job: Job, origin: str, out: Path) -> list[str]:
    size = (f"{job.min_nodes} to {job.max_nodes} pods (elastic)" if job.elastic else f"{job.max_nodes} pod(s)")
    lines = [
        f"# Written by `launcher k8s` on {time.strftime('%Y-%m-%d %H:%M:%S')} from: {origin}",
        f"# A Kubeflow PyTorchJob (training-operator) on {size} x {job.nproc} worker(s), and the ConfigMap",
        f"# {job.config_map} holding the resolved config (mounted at {CONFIG_DIR}; editing the YAML later changes",
        "# nothing here). The image must hold this project: the pods run `python -m launcher run`.",
        f"#   apply: kubectl apply -f {out}",
        f"#   watch: kubectl get pytorchjob {job.name}; kubectl logs -f {job.host}",
        f"#   stop:  kubectl delete -f {out}",
    ]
    if job.max_nodes > 1:
        lines += [f"# Rendezvous: {job.endpoint}, served by the pod {job.host}; if that pod goes, the others wait for",
                  "# it (restarting) and every pod resumes from the newest checkpoint."]
    if job.pvc:
        lines += [f"# Run dir: {job.run_dir} on the PersistentVolumeClaim {job.pvc}, shared by every pod. The claim",
                  "# must be ReadWriteMany when pods can run on different nodes."]
    elif job.in_bucket:
        lines += [f"# Run dir: {job.run_dir} on each pod's own disk (no --pvc): metrics.jsonl, tb/ and wandb/ are",
                  "# written by the pod running rank 0 and lost when its container restarts."]
    else:
        lines += [f"# WARNING: no --pvc. The run dir {job.run_dir} is on each pod's own disk: checkpoints are lost",
                  "# with the pod and the pods do not share them, so a restarted job cannot resume. Give --pvc CLAIM."]
    if job.in_bucket:
        lines += [f"# Checkpoints: {job.checkpoint_dir}, shared by every pod: a restarted pod resumes from them."]
    elif job.pvc and job.checkpoint_dir is None:
        lines += ["# Checkpoints: in the run dir on the claim: they survive a pod, and a restarted pod resumes from",
                  "# them."]
    elif job.pvc:
        lines += [f"# Checkpoints: {job.checkpoint_dir} (checkpoint.dir), shared and kept only if that path is on the",
                  f"# claim, under {job.mount}."]
    if job.secrets:
        lines += [f"# Environment from the Secret(s) {', '.join(job.secrets)} (envFrom), not written here."]
    return lines


def report(job: Job, cfg, out: Path, config_path: Path) -> None:
    size = f"{job.min_nodes}:{job.max_nodes}" if job.elastic else str(job.max_nodes)
    meet = f"rendezvous {job.endpoint}" if job.max_nodes > 1 else "one pod, no rendezvous"
    say(f"# wrote {out} (PyTorchJob {job.name}: {size} pod(s) x {job.nproc} worker(s), {meet}); the pods run the "
        f"config saved as {config_path}")
    if not job.pvc and job.in_bucket:
        warn(f"no --pvc: each pod keeps its own run dir ({job.run_dir}): metrics.jsonl, tb/ and wandb/ are on the "
             f"disk of the pod running rank 0, lost when its container restarts; checkpoints go to "
             f"{job.checkpoint_dir}. Give --pvc CLAIM to keep the run dir")
    elif not job.pvc:
        warn(f"no --pvc: the run dir ({job.run_dir}) is on each pod's own disk, so checkpoints are lost with a pod "
             "and a restarted pod cannot resume; give --pvc CLAIM (a PersistentVolumeClaim every pod can mount), or "
             "set checkpoint.dir to object storage (s3://bucket/prefix)")
    if job.in_bucket and not job.secrets:
        warn(f"checkpoint.dir is {job.checkpoint_dir} and no --env-from-secret: the pods need its credentials from the "
             "cluster (an IAM role, workload identity) or the image; else give --env-from-secret NAME, a Secret "
             "holding e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    recipe = cfg.recipe_name
    if recipe.endswith(".py") or "/" in recipe:
        warn(f"the recipe is the file {recipe}: the image must hold it at that path (or install it as a module "
             "and name it by its dotted name)")
    say(f"# apply with: kubectl apply -f {out}")
