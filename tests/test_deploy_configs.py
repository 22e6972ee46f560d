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


def test_cluster_configs_exist():
    assert "cluster.yaml" in CLUSTER_FILES


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
    for pattern in (".venv", "data/", "runs/", ".git"):
        assert pattern in env["excludes"]
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
