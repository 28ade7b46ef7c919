"""The cluster-free harness, proven with the real tools: the ``kubernetes`` client, kopf,
local processes as pods."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import kopf
import kubernetes.client
import kubernetes.watch
import pytest
from harness import (  # tests/ is on sys.path: pytest puts tests/conftest.py's folder there
    ADMIN_USER,
    KUBELET_USER,
    OPERATOR_USER,
    EmulatorServer,
    KubeClient,
    Kubelet,
    OperatorThread,
)
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
JOBS = f"{GROUP}/{VERSION}/{PLURAL}"


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec or {"steps": 1},
    }


def python_pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "python", "command": ["python", "-c", code]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "harness-test"}},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def phase_is(*phases: str) -> Any:
    return lambda pod: pod is not None and pod.get("status", {}).get("phase") in phases


# -- the API --------------------------------------------------------------------------


def test_custom_object_crud_and_status_subresource(kube: EmulatorServer) -> None:
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    created, code, _ = api.create_namespaced_custom_object_with_http_info(
        GROUP, VERSION, "default", PLURAL, job("j1", steps=1) | {"status": {"state": "Bogus"}}
    )
    assert code == 201
    meta = created["metadata"]
    assert meta["namespace"] == "default" and meta["generation"] == 1
    assert meta["uid"] and meta["creationTimestamp"] and meta["resourceVersion"]
    assert "status" not in created  # dropped on create, as with a status subresource

    patched = api.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "j1", {"spec": {"steps": 2}, "status": {"state": "X"}}
    )
    assert patched["metadata"]["generation"] == 2
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert "status" not in patched  # the main resource does not write the status

    status = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "j1", {"spec": {"steps": 3}, "status": {"state": "Ok"}}
    )
    assert status["status"] == {"state": "Ok"}
    assert status["spec"] == {"steps": 2}  # /status does not write the spec
    assert status["metadata"]["generation"] == 2  # a status change is no spec change

    labelled = api.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "j1", {"metadata": {"labels": {"team": "a"}}}
    )
    assert labelled["metadata"]["generation"] == 2  # neither is a metadata change

    replaced = api.replace_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "j1", job("j1", steps=9)
    )
    assert replaced["spec"] == {"steps": 9} and replaced["status"] == {"state": "Ok"}
    assert replaced["metadata"]["generation"] == 3

    listed = api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert listed["kind"] == "FineTuneJobList"
    assert listed["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]
    assert [o["metadata"]["name"] for o in listed["items"]] == ["j1"]
    assert api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j1") == replaced

    stale = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "spec": {"steps": 0}}
    with pytest.raises(ApiException) as conflict:
        api.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j1", stale)
    assert conflict.value.status == 409

    test_op = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}]
    with pytest.raises(ApiException) as invalid:
        api.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "default",
            PLURAL,
            "j1",
            test_op,
            _content_type="application/json-patch+json",
        )
    assert invalid.value.status == 422

    api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j1")
    with pytest.raises(ApiException) as gone:
        api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "j1")
    assert gone.value.status == 404


def test_core_api_selectors_namespaces_and_discovery(kube: EmulatorServer) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client())
    assert [ns.metadata.name for ns in core.list_namespace().items] == ["default"]
    core.create_namespace({"metadata": {"name": "team-a"}})
    for ns, app in (("default", "a"), ("default", "b"), ("team-a", "a")):
        body = {"metadata": {"generateName": "cm-", "labels": {"app": app}}, "data": {"k": "v"}}
        created = core.create_namespaced_config_map(ns, body)
        assert created.metadata.name.startswith("cm-") and len(created.metadata.name) == 8

    def names(**kwargs: Any) -> int:
        return len(core.list_config_map_for_all_namespaces(**kwargs).items)

    assert names() == 3
    assert names(label_selector="app=a") == 2
    assert names(label_selector="app in (a,b),app!=b") == 2
    assert names(field_selector="metadata.namespace=team-a") == 1
    assert len(core.list_namespaced_config_map("default").items) == 2
    assert core.list_namespaced_config_map("default").kind == "ConfigMapList"

    assert kubernetes.client.CoreApi(kube.api_client()).get_api_versions().versions == ["v1"]
    core_resources = core.get_api_resources()
    assert core_resources.group_version == "v1"
    groups = kubernetes.client.ApisApi(kube.api_client()).get_api_versions().groups
    assert GROUP in {group.name for group in groups}


def test_watch_resumes_from_a_resource_version(kube: EmulatorServer) -> None:
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    since = api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["metadata"]
    api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job("w1"))
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "w1", {"status": {"state": "Running"}}
    )
    api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w1")

    watch = kubernetes.watch.Watch()
    stream = watch.stream(
        api.list_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        PLURAL,
        resource_version=since["resourceVersion"],
        timeout_seconds=5,
    )
    events = []
    for event in stream:
        events.append((event["type"], event["object"].get("status", {}).get("state")))
        if len(events) == 3:
            watch.stop()
    assert events == [("ADDED", None), ("MODIFIED", "Running"), ("DELETED", "Running")]


def test_watch_sees_live_events(kube: EmulatorServer) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client())
    seen: list[tuple[str, str]] = []

    def watch() -> None:
        watch = kubernetes.watch.Watch()
        stream = watch.stream(
            core.list_namespaced_config_map, "default", label_selector="app=x", timeout_seconds=5
        )
        for event in stream:
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 2:
                watch.stop()

    thread = threading.Thread(target=watch)
    thread.start()
    while kube.call(lambda: kube.emulator.watch_count) == 0:  # the watch is live
        time.sleep(0.01)
    core.create_namespaced_config_map("default", {"metadata": {"name": "other"}})
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c", "labels": {"app": "x"}}}
    )
    core.patch_namespaced_config_map("c", "default", {"metadata": {"labels": {"app": "y"}}})
    thread.join()
    assert seen == [("ADDED", "c"), ("DELETED", "c")]  # left the selector: DELETED


def test_watch_bookmarks_and_initial_events(kube: EmulatorServer) -> None:
    kube.emulator.bookmark_interval = 0.2
    client = KubeClient(kube.url, token=ADMIN_USER)
    client.create("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "b"}})
    params = {"sendInitialEvents": "true", "allowWatchBookmarks": "true"}
    events = list(client.watch("/api/v1/namespaces/default/configmaps", params, timeout=1))
    assert [e["type"] for e in events[:2]] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert {e["type"] for e in events[2:]} == {"BOOKMARK"} and len(events) >= 4


# -- the kubelet ----------------------------------------------------------------------

REPORT = (
    "import os; "
    "open(os.environ['KUBETUNE_TERMINATION_MESSAGE_PATH'], 'w').write("
    "'|'.join(os.environ[k] for k in ('POD_IP', 'POD_NAME', 'TOKEN', 'GREETING'))); "
    "print('hello from', os.environ['POD_NAME'])"
)


def test_kubelet_runs_a_pod_to_completion(kube: EmulatorServer, kubelet: Kubelet) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client())
    core.create_namespaced_secret(
        "default", {"metadata": {"name": "s"}, "stringData": {"t": "sekrit"}}
    )
    pod = python_pod("p1", REPORT)
    pod["spec"]["containers"][0]["env"] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}},
        {"name": "GREETING", "value": "hi $(POD_NAME)"},
    ]
    core.create_namespaced_pod("default", pod)

    done = kube.wait_for("v1/pods", "default", "p1", phase_is("Succeeded", "Failed"))
    assert done is not None
    status = done["status"]
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (status["phase"], terminated["exitCode"], terminated["reason"]) == (
        "Succeeded",
        0,
        "Completed",
    )
    assert status["podIP"] == "127.0.0.2"
    assert terminated["message"] == "127.0.0.2|p1|sekrit|hi p1"
    assert "hello from p1" in kubelet.logs("p1")
    assert core.read_namespaced_pod_log("p1", "default").strip() == "hello from p1"
    assert ("get", "", "secrets") in kube.emulator.audit.permissions(user=KUBELET_USER)


def test_kubelet_waits_for_a_missing_secret(kube: EmulatorServer, kubelet: Kubelet) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client())
    pod = python_pod("needs-secret", "import os; print(os.environ['TOKEN'])")
    secret_ref = {"secretKeyRef": {"name": "later", "key": "t"}}
    pod["spec"]["containers"][0]["env"] = [{"name": "TOKEN", "valueFrom": secret_ref}]
    core.create_namespaced_pod("default", pod)

    def waiting(pod: dict[str, Any] | None) -> bool:
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
        return "waiting" in statuses[0].get("state", {})

    stuck = kube.wait_for("v1/pods", "default", "needs-secret", waiting)
    assert stuck is not None and stuck["status"]["phase"] == "Pending"
    state = stuck["status"]["containerStatuses"][0]["state"]["waiting"]
    assert state == {"reason": "CreateContainerConfigError", "message": 'secret "later" not found'}

    core.create_namespaced_secret("default", {"metadata": {"name": "later"}, "data": {"t": "b2s="}})
    kube.wait_for("v1/pods", "default", "needs-secret", phase_is("Succeeded"))
    assert kubelet.logs("needs-secret") == "ok\n"


MOUNTS = (
    "import os, pathlib; "
    "pathlib.Path(os.environ['HOME'], 'scratch.txt').write_text('x'); "
    "pathlib.Path('/data/checkpoint').write_text(os.environ['POD_NAME']); "
    "open('/dev/termination-log', 'w').write(os.environ['HOME'])"
)


def test_kubelet_rewrites_mount_paths(kube: EmulatorServer, kubelet: Kubelet) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client())
    pod = python_pod("m1", MOUNTS)
    pod["spec"]["volumes"] = [
        {"name": "scratch", "emptyDir": {}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "ckpt"}},
    ]
    container = pod["spec"]["containers"][0]
    container["volumeMounts"] = [
        {"name": "scratch", "mountPath": "/tmp"},
        {"name": "data", "mountPath": "/data"},
    ]
    container["env"] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    core.create_namespaced_pod("default", pod)
    done = kube.wait_for("v1/pods", "default", "m1", phase_is("Succeeded", "Failed"))
    assert done is not None and done["status"]["phase"] == "Succeeded", kubelet.logs("m1")
    home = Path(done["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert home == kubelet.run("m1").directory / "volumes" / "scratch"
    assert (home / "scratch.txt").read_text() == "x"
    assert (kubelet.workdir / "claims" / "default" / "ckpt" / "checkpoint").read_text() == "m1"


def test_kubelet_kills_deletes_and_enforces_deadlines(
    kube: EmulatorServer, kubelet: Kubelet
) -> None:
    core = kubernetes.client.CoreV1Api(kube.api_client())
    sleeper = "import time; print('sleeping', flush=True); time.sleep(60)"
    for name, spec in (("killed", {}), ("deleted", {}), ("late", {"activeDeadlineSeconds": 1})):
        core.create_namespaced_pod("default", python_pod(name, sleeper, **spec))
    for name in ("killed", "deleted", "late"):
        kube.wait_for("v1/pods", "default", name, phase_is("Running"))
    ips = {kubelet.run(name).ip for name in ("killed", "deleted", "late")}
    assert len(ips) == 3

    kubelet.kill("killed", signal.SIGKILL)
    killed = kube.wait_for("v1/pods", "default", "killed", phase_is("Failed"))
    assert killed is not None
    assert killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137

    core.delete_namespaced_pod("deleted", "default")
    assert kubelet.wait_finished("deleted", timeout=10) == 128 + signal.SIGTERM

    late = kube.wait_for("v1/pods", "default", "late", phase_is("Failed"))
    assert late is not None and late["status"]["reason"] == "DeadlineExceeded"


# -- kopf -----------------------------------------------------------------------------

POD_CODE = (
    "import os, json; print('hi'); "
    "open(os.environ['KUBETUNE_TERMINATION_MESSAGE_PATH'], 'w').write(json.dumps({'loss': 0.5}))"
)


def tiny_operator(kube: EmulatorServer, deleted: list[str]) -> kopf.OperatorRegistry:
    """A FineTuneJob operator in miniature: a pod per job, its result into the status."""
    registry = kopf.OperatorRegistry()
    client = kube.api_client(OPERATOR_USER)
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)

    @kopf.on.create(GROUP, VERSION, PLURAL, id="create_pod", registry=registry)
    def create_pod(name: str, namespace: str, body: kopf.Body, **_: Any) -> dict[str, str]:
        pod = python_pod(f"{name}-pod", POD_CODE)
        pod["metadata"]["labels"]["kubetune.io/job"] = name
        kopf.adopt(pod, owner=body)
        core.create_namespaced_pod(namespace, pod)
        return {"pod": pod["metadata"]["name"]}

    @kopf.on.field("v1", "pods", field="status.phase", labels={"kubetune.io/job": kopf.PRESENT},
                   registry=registry)  # fmt: skip
    def pod_phase(
        new: str, namespace: str, labels: kopf.Labels, status: kopf.Status, **_: Any
    ) -> None:
        if new in ("Succeeded", "Failed"):
            message = status["containerStatuses"][0]["state"]["terminated"]["message"]
            patch = {"status": {"state": new, "result": message}}
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, labels["kubetune.io/job"], patch
            )

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def delete_job(name: str, **_: Any) -> None:
        deleted.append(name)

    return registry


def test_kopf_operator_lifecycle(kube: EmulatorServer, kubelet: Kubelet) -> None:
    deleted: list[str] = []
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    with OperatorThread(tiny_operator(kube, deleted), kube.connection_info()):
        api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job("tj"))
        done = kube.wait_for(JOBS, "default", "tj", lambda o: {"state", "create_pod"} <= set(
            (o or {}).get("status", {})))  # fmt: skip
        assert done is not None
        assert done["status"]["state"] == "Succeeded"
        assert done["status"]["result"] == '{"loss": 0.5}'
        assert done["status"]["create_pod"] == {"pod": "tj-pod"}  # the handler's result
        assert done["metadata"]["finalizers"]  # kopf's, for the on.delete handler
        pod = kube.object("v1/pods", "default", "tj-pod")
        assert pod is not None
        assert pod["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
        assert kubelet.logs("tj-pod").strip() == "hi"

        api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "tj")
        kube.wait_for(JOBS, "default", "tj", lambda o: o is None)
        kube.wait_for("v1/pods", "default", "tj-pod", lambda o: o is None)  # collected
        assert deleted == ["tj"]

    used = kube.emulator.audit.permissions(user=OPERATOR_USER)
    assert {
        ("list", GROUP, PLURAL),
        ("watch", GROUP, PLURAL),
        ("patch", GROUP, PLURAL),
        ("patch", GROUP, f"{PLURAL}/status"),
        ("list", "", "pods"),
        ("watch", "", "pods"),
        ("create", "", "pods"),
    } <= used
    assert not any(resource == "secrets" for _, _, resource in used)
    rules = [
        {"apiGroups": [GROUP], "resources": [PLURAL, f"{PLURAL}/status"], "verbs": ["*"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "list", "watch", "patch"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    ]
    assert kube.emulator.audit.uncovered(rules, user=OPERATOR_USER) == []
