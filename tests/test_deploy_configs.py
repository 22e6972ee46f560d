"""The deployment files parse and pass the checks their tools run before touching a cloud.

cluster.yaml goes through the first half of `ray up` (`prepare_config` then `validate_config`,
as in `ray.autoscaler._private.commands._bootstrap_config`); only the provider calls that need
credentials are left out. EC2 node configs are also checked against botocore's offline model of
RunInstances, which is what Ray passes them to. jobs/rayjob.yaml is checked for what KubeRay
needs to run it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(p.name for p in REPO.glob("cluster*.yaml"))
RAY_IMAGE = re.compile(r"^rayproject/ray:(\d+\.\d+\.\d+)-py\d+-(?:gpu|cpu|cu\d+)$")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def bootstrap_offline(config: dict) -> dict:
    """What `ray up` does to a config before its first cloud call: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def pinned_ray_version(config: dict) -> str:
    """The Ray version in a cluster config's docker image tag."""
    m = RAY_IMAGE.match(config["docker"]["image"])
    assert m, f"docker image {config['docker']['image']!r} is not a versioned rayproject/ray image"
    return m.group(1)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_config_passes_ray_validation(name):
    config = load(name)
    prepared = bootstrap_offline(config)
    head = prepared["head_node_type"]
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head}
    assert prepared["available_node_types"][head]["resources"].get("GPU", 0) == 0
    gpu_types = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no worker type offers a GPU"
    assert all(v["min_workers"] == 0 for v in gpu_types), "idle GPUs should scale to zero"
    assert all(0 < v["max_workers"] <= prepared["max_workers"] for v in gpu_types)
    assert any("pip install" in c and "-e ." in c for c in prepared["setup_commands"])
    assert version_tuple(pinned_ray_version(config)) >= (2, 59, 0)  # token auth as tested here
    # Token auth: every node starts with it on and gets the same token file.
    for cmd in (*prepared["head_start_ray_commands"], *prepared["worker_start_ray_commands"]):
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token" in cmd, cmd
    assert "~/.ray/auth_token" in prepared["file_mounts"]


def test_cluster_configs_exist_and_agree_on_ray():
    assert {"cluster.yaml", "cluster-gcp.yaml"} <= set(CLUSTER_FILES)
    assert len({pinned_ray_version(load(name)) for name in CLUSTER_FILES}) == 1


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (("idle_timout_minutes",), 10, "'idle_timout_minutes' was unexpected"),
        (("available_node_types", "gpu", "max_worker"), 2, "'max_worker' was unexpected"),
        (("available_node_types", "gpu", "resources", "GPU"), "one", "'one' is not of type 'integer'"),
        (("docker", "imagee"), "rayproject/ray:2.60.0-py311-gpu", "'imagee' was unexpected"),
        (("head_node_type",), "cpu-head", "must be one of `available_node_types`"),
    ],
    ids=["top-level", "node-type", "resource-type", "docker", "head-type"],
)
def test_cluster_config_typo_fails_validation(path, value, says):
    config = load("cluster.yaml")
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(Exception, match=re.escape(says)):
        bootstrap_offline(config)


def test_aws_node_configs_match_run_instances():
    """Ray hands each node_config to EC2 RunInstances; a misspelt field fails only there."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    config = load("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    for name, node in config["available_node_types"].items():
        report = ParamValidator().validate({**node["node_config"], "MinCount": 1, "MaxCount": 1}, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    bad = {**config["available_node_types"]["gpu"]["node_config"], "InstanceTyp": "g5.2xlarge"}
    assert ParamValidator().validate({**bad, "MinCount": 1, "MaxCount": 1}, shape).has_errors()


def test_runtime_env_file_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    spec = load("jobs/runtime_env.yaml")
    # Ray accepts unknown top-level keys as plugin names, so a typo would be silently ignored.
    assert set(spec) <= RuntimeEnv.known_fields, set(spec) - RuntimeEnv.known_fields
    env = RuntimeEnv(**spec)  # rejects malformed values
    assert "working_dir" not in spec, "the working dir comes from --working-dir on the command line"
    for pattern in (".venv", "/data/", "/runs/", ".git"):
        assert pattern in env["excludes"]
    # Anchored: the package's own data/ folder (code) is never excluded; Ray matches with its pathspec.
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    assert spec.match_file("data/train.csv") and spec.match_file("runs/demo/run/oof.parquet")
    assert not spec.match_file("spine_ray/data/dicom.py") and not spec.match_file("spine_ray/data/__init__.py")
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert all(isinstance(v, str) for v in env["env_vars"].values())


# Field names of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go). The operator's CRD prunes unknown fields silently, so a typo here would
# only show up as a cluster that ignores the setting.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {
    "template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType",
}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}


def rayjob_problems(job: dict) -> list[str]:
    """What keeps a RayJob manifest from running this pipeline; empty when it is fine."""
    problems = []
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        problems.append("not a ray.io/v1 RayJob")
    spec = job.get("spec", {})
    cluster = spec.get("rayClusterSpec", {})
    head = cluster.get("headGroupSpec", {})
    workers = cluster.get("workerGroupSpecs", [])
    for where, keys, allowed in [
        ("spec", spec, RAYJOB_SPEC_FIELDS),
        ("rayClusterSpec", cluster, RAYCLUSTER_SPEC_FIELDS),
        ("headGroupSpec", head, HEAD_GROUP_FIELDS),
        *((f"workerGroupSpecs[{i}]", w, WORKER_GROUP_FIELDS) for i, w in enumerate(workers)),
    ]:
        problems += [f"{where}: unknown field {k!r}" for k in set(keys) - allowed]
    if "train" not in spec.get("entrypoint", ""):
        problems.append("entrypoint does not run training")
    if not spec.get("shutdownAfterJobFinishes"):
        problems.append("the cluster outlives the job (shutdownAfterJobFinishes)")
    if not head.get("template", {}).get("spec", {}).get("containers"):
        problems.append("no head container")
    gpu_groups = [
        w for w in workers
        if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
               for c in w["template"]["spec"]["containers"])
    ]
    if not gpu_groups:
        problems.append("no worker group requests nvidia.com/gpu")
    for w in workers:
        if not w.get("minReplicas", 0) <= w.get("replicas", 0) <= w.get("maxReplicas", 2**31 - 1):
            problems.append(f"{w.get('groupName')}: replicas outside [minReplicas, maxReplicas]")
    return problems


def rayjob_containers(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_has_what_kuberay_needs():
    job = load("jobs/rayjob.yaml")
    assert rayjob_problems(job) == []
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_rayjob_runs_the_ray_version_cluster_yaml_pins():
    job = load("jobs/rayjob.yaml")
    version = pinned_ray_version(load("cluster.yaml"))
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    for c in rayjob_containers(job):
        m = RAY_IMAGE.match(c["image"])
        assert m and m.group(1) == version, c["image"]


def test_rayjob_takes_s3_credentials_from_a_secret_and_auth_on():
    job = load("jobs/rayjob.yaml")
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    for c in rayjob_containers(job):
        env = {e["name"]: e for e in c["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[key]["valueFrom"], (c["name"], key)


def test_rayjob_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load(load("jobs/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert set(spec) <= RuntimeEnv.known_fields, set(spec) - RuntimeEnv.known_fields
    env = RuntimeEnv(**spec)
    assert env["working_dir"].endswith(".zip")  # KubeRay cannot upload a local directory
    packages = " ".join(env["pip"]["packages"])
    for dep in ("torch", "timm", "pydicom", "s3fs"):
        assert dep in packages


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda j: j["spec"].update(shutdownAfterJobFinished=True), "unknown field 'shutdownAfterJobFinished'"),
        (lambda j: j["spec"]["rayClusterSpec"].update(workerGroupSpec=[]), "unknown field 'workerGroupSpec'"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplica=3), "unknown field 'maxReplica'"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         ["resources"]["limits"].pop("nvidia.com/gpu"), "no worker group requests nvidia.com/gpu"),
        (lambda j: j.update(apiVersion="ray.io/v1alpha1"), "not a ray.io/v1 RayJob"),
    ],
    ids=["spec-typo", "cluster-typo", "worker-typo", "no-gpu", "old-api"],
)
def test_rayjob_mistakes_are_caught(mutate, says):
    job = load("jobs/rayjob.yaml")
    mutate(job)
    assert any(says in p for p in rayjob_problems(job)), rayjob_problems(job)


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_mounts_exist_from_the_repo_root(name, tmp_path, monkeypatch):
    """`ray up`, run from the repository root, hashes every local file mount before syncing it."""
    from ray.autoscaler._private.util import hash_runtime_conf

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 64)  # what `ray get-auth-token --generate` makes
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(REPO)
    mounts = bootstrap_offline(load(name))["file_mounts"]
    for remote, local in mounts.items():
        assert Path(local).expanduser().exists(), f"{remote}: {local} missing"
    assert hash_runtime_conf(mounts, None, {}, generate_file_mounts_contents_hash=True)[1]
    assert not any(Path(local).expanduser().resolve() == REPO for local in mounts.values()), (
        "mounting the whole checkout makes `ray up` hash data/ and .venv"
    )
