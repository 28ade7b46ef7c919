"""The harness's pod network: cluster DNS names of pods, and one port space per pod.

All pods of the harness are processes of one machine, each with a loopback address of
its own (``127.0.0.N``); they cannot use real DNS, and they share one set of ports. Two
things a real cluster gives pods are emulated here, for the kubelet to apply to a
container's environment before it starts:

**Cluster DNS** (:class:`ClusterDNS`). A pod with ``spec.hostname`` H and
``spec.subdomain`` S in namespace NS is reachable as ``H.S`` (from NS), ``H.S.NS``,
``H.S.NS.svc`` and ``H.S.NS.svc.cluster.local`` when a headless Service named S
(``clusterIP: None``) in NS selects it (its ``spec.selector`` is a subset of the pod's
labels); that is how rank 0 of an Indexed Job is found (``PET_MASTER_ADDR``). Since a
process cannot look such a name up, the kubelet **replaces every env value that is
exactly such a name by the pod's IP**. A name whose Service or pod does not exist yet
(but one of them does) is waited for, as a resolver retrying would (at most
``timeout`` seconds, while the pod stays ``Pending``); after that, or when neither
exists, the value is left as it is and the process fails to resolve it, as with
NXDOMAIN. A pod resolves its own name at once (the kubelet writes it into the pod's
``/etc/hosts``). Simplifications: a pod counts as an endpoint once it has an IP and is
neither terminating nor finished (``publishNotReadyAddresses`` is not looked at); only
whole env values are replaced (not ``host:port`` values, not command arguments).

**Per-pod ports** (:class:`PortMap`). PyTorch's rendezvous store (torchrun's TCPStore at
``PET_MASTER_PORT``, 29500 by default) listens on *all* interfaces (checked with torch
2.13: ``*:29500``), so two rank-0 pods on one machine would collide where a cluster gives
each pod its own network namespace. The kubelet therefore gives each rank-0 pod one
free port of its own per requested port: in every pod whose ``PET_MASTER_ADDR`` (or
``MASTER_ADDR``) names that pod (by DNS name, or itself as ``localhost``/``127.0.0.1``/
its own name or IP), ``PET_MASTER_PORT`` (or ``MASTER_PORT``) is rewritten to it. Other
ports are not remapped.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from collections.abc import Iterable

from .client import Body, KubeClient, KubeError

CLUSTER_DOMAIN = "cluster.local"
MASTER_ENV = (("PET_MASTER_ADDR", "PET_MASTER_PORT"), ("MASTER_ADDR", "MASTER_PORT"))
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$")

PodName = tuple[str, str, str]  # hostname, subdomain, namespace


def parse_pod_name(value: str, namespace: str) -> PodName | None:
    """``(hostname, subdomain, namespace)`` if ``value`` has the shape of a pod's DNS name."""
    if not _DNS_NAME.match(value):
        return None
    labels = value.split(".")
    if len(labels) == 2:
        return labels[0], labels[1], namespace
    if len(labels) == 3 or (len(labels) == 4 and labels[3] == "svc"):
        return labels[0], labels[1], labels[2]
    if len(labels) == 6 and ".".join(labels[3:]) == f"svc.{CLUSTER_DOMAIN}":
        return labels[0], labels[1], labels[2]
    return None


def own_name(pod: Body) -> PodName | None:
    spec, meta = pod.get("spec") or {}, pod["metadata"]
    if spec.get("hostname") and spec.get("subdomain"):
        return spec["hostname"], spec["subdomain"], meta["namespace"]
    return None


@dataclasses.dataclass(frozen=True)
class Address:
    """What a pod DNS name resolved to."""

    ip: str
    pod_uid: str


def _serves(service: Body | None, pod: Body) -> bool:
    """Whether a headless Service selects the pod (so the pod has a DNS record)."""
    if service is None or (service.get("spec") or {}).get("clusterIP") != "None":
        return False
    selector = (service.get("spec") or {}).get("selector") or {}
    labels = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _endpoint(pod: Body) -> bool:
    status = pod.get("status") or {}
    return (
        bool(status.get("podIP"))
        and not pod["metadata"].get("deletionTimestamp")
        and status.get("phase") not in ("Succeeded", "Failed")
    )


class ClusterDNS:
    """Resolves pod DNS names by reading Services and pods through the API."""

    def __init__(self, client: KubeClient, timeout: float = 60.0, poll: float = 0.1) -> None:
        self.client = client
        self.timeout = timeout
        self.poll = poll

    def resolve(
        self, pod: Body, own_ip: str, values: Iterable[str], cancelled: threading.Event
    ) -> tuple[dict[str, Address], list[str]]:
        """The values that are pod DNS names, resolved, and those that stayed unresolved."""
        namespace = pod["metadata"]["namespace"]
        wanted = {v: name for v in set(values) if (name := parse_pod_name(v, namespace))}
        found: dict[str, Address] = {}
        for value, name in list(wanted.items()):
            if name == own_name(pod):
                found[value] = Address(own_ip, pod["metadata"]["uid"])
                del wanted[value]
        deadline = time.monotonic() + self.timeout
        first = True
        while wanted:
            services = {
                (s["metadata"]["namespace"], s["metadata"]["name"]): s
                for s in self._items("/api/v1/services")
            }
            pods = {
                ns: self._items(f"/api/v1/namespaces/{ns}/pods")
                for ns in {name[2] for name in wanted.values()}
            }
            for value, (host, subdomain, ns) in list(wanted.items()):
                named = [
                    p
                    for p in pods[ns]
                    if (p.get("spec") or {}).get("hostname") == host
                    and (p.get("spec") or {}).get("subdomain") == subdomain
                ]
                service = services.get((ns, subdomain))
                ready = [p for p in named if _endpoint(p) and _serves(service, p)]
                if ready:
                    newest = max(ready, key=lambda p: p["metadata"].get("creationTimestamp", ""))
                    found[value] = Address(newest["status"]["podIP"], newest["metadata"]["uid"])
                    del wanted[value]
                elif first and service is None and not named:
                    del wanted[value]  # not a cluster name at all: leave it alone at once
            first = False
            if not wanted or time.monotonic() >= deadline or cancelled.wait(self.poll):
                break
        return found, sorted(wanted)

    def _items(self, path: str) -> list[Body]:
        """A LIST's items; none when the API refuses (e.g. a value like ``a.b.NotANamespace``)."""
        try:
            return list(self.client.get(path).get("items") or [])
        except KubeError:
            return []


def free_port() -> int:
    """A TCP port nothing listens on now (on any loopback address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortMap:
    """One free port per (pod, requested port): the pod's own port space, emulated."""

    def __init__(self) -> None:
        self._ports: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def port(self, pod_uid: str, requested: str) -> int:
        with self._lock:
            key = (pod_uid, requested)
            if key not in self._ports:
                taken = set(self._ports.values())
                port = free_port()
                while port in taken:
                    port = free_port()
                self._ports[key] = port
            return self._ports[key]

    def forget(self, pod_uid: str) -> None:
        """Drop a finished pod's ports."""
        with self._lock:
            for key in [k for k in self._ports if k[0] == pod_uid]:
                del self._ports[key]


def apply_network(
    env: dict[str, str],
    resolved: dict[str, Address],
    pod: Body,
    own_ip: str,
    ports: PortMap,
) -> dict[str, str]:
    """The env with pod DNS names replaced by IPs and master ports remapped (see above)."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    own = {*LOCAL_NAMES, own_ip, meta["name"], spec.get("hostname") or meta["name"]}
    result = {k: resolved[v].ip if v in resolved else v for k, v in env.items()}
    for addr_var, port_var in MASTER_ENV:
        if port_var not in env:
            continue
        addr = env.get(addr_var, "localhost")
        if addr in resolved:
            owner = resolved[addr].pod_uid
        elif addr in own:
            owner = meta["uid"]
        else:
            continue
        result[port_var] = str(ports.port(owner, env[port_var]))
    return result
