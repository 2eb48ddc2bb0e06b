"""Cluster and deployment files: Ray's own cluster-config validation, and the KubeRay/CronJob fields."""

import copy

import yaml

from conftest import REPO

K8S = REPO / "deploy" / "k8s"
ENTRY = "python jobs/restore_archive.py"


def test_ray_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and types["head"]["resources"]["CPU"] == 0
    # a g6.2xlarge has 8 vCPUs: one is kept for the Restore actor (it asks Ray for its GPU only)
    assert raw["available_node_types"]["gpu_worker"]["resources"] == {"CPU": 7}
    assert "--set restore.device=cuda --set detect.device=gpu" in (REPO / "ray_cluster.yaml").read_text()
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5", "g6"))
    for name in ("gpu_worker", "cpu_worker"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]
        assert "IamInstanceProfile" in types[name]["node_config"]
    assert raw["docker"]["image"]
    text = (REPO / "ray_cluster.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def _groups(cluster_spec):
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


def _check_cluster(spec):
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"]["mode"] == "token"
    groups = _groups(spec)
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    # GPU pods advertise one CPU fewer than they have: the Restore actor's core (see job.plan_resources)
    assert int(groups["gpu"]["rayStartParams"]["num-cpus"]) == int(gpu["resources"]["limits"]["cpu"]) - 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    images = {head["image"], gpu["image"], groups["cpu"]["template"]["spec"]["containers"][0]["image"]}
    assert len(images) == 1 and images.pop().endswith("archive-restore:0.1.0")
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_kuberay_raycluster():
    rc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    _check_cluster(rc["spec"])


def test_kuberay_rayjob_runs_the_entrypoint_and_shuts_down():
    rj = yaml.safe_load((K8S / "rayjob.yaml").read_text())
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    spec = rj["spec"]
    assert spec["entrypoint"].startswith(ENTRY) and "--reprocess outdated" in spec["entrypoint"]
    assert "--set restore.device=cuda" in spec["entrypoint"] and "--set detect.device=gpu" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster(spec["rayClusterSpec"])


def test_cronjob_submits_the_rayjob():
    docs = list(yaml.safe_load_all((K8S / "cronjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    cron = kinds["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "kubectl create -f -" in " ".join(pod["containers"][0]["args"])
    assert pod["volumes"][0]["configMap"]["name"] == "archive-restore-rayjob"
    assert "create" in kinds["Role"]["rules"][0]["verbs"] and "rayjobs" in kinds["Role"]["rules"][0]["resources"]


def test_dockerfile_installs_the_package_on_a_cuda_ray_image():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "cu" in text.split("FROM", 1)[1].split()[0]
    assert "pip install --no-cache-dir ." in text and "ARCHIVE_RESTORE_WEIGHTS_DIR" in text
