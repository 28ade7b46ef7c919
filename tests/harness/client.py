"""A minimal JSON client for the Kubernetes REST API (dicts in, dicts out), on ``requests``.

The kubelet harness uses it instead of the ``kubernetes`` package: no model classes, no
date parsing, and watches that end on the server's ``timeoutSeconds``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests

Body = dict[str, Any]


class KubeError(RuntimeError):
    """A non-2xx answer of the API server."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


class KubeClient:
    """A synchronous client for one API server and one user (a bearer token)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # never through a proxy: the server is on 127.0.0.1
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Body:
        response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 300:
            raise KubeError(response.status_code, response.text)
        return response.json() if response.content else {}

    def get(self, path: str, **params: str) -> Body:
        return self._request("GET", path, params=params)

    def create(self, path: str, body: Body) -> Body:
        return self._request("POST", path, json=body)

    def patch(self, path: str, body: Body | list[Body]) -> Body:
        """A merge-patch for a dict, a JSON-patch for a list of operations."""
        kind = "merge-patch" if isinstance(body, dict) else "json-patch"
        headers = {"Content-Type": f"application/{kind}+json"}
        return self._request("PATCH", path, data=json.dumps(body), headers=headers)

    def delete(self, path: str) -> Body:
        return self._request("DELETE", path)

    def watch(self, path: str, *, timeout: int = 1, **params: str) -> Iterator[Body]:
        """Watch events until the server ends the stream after ``timeout`` seconds."""
        params = {**params, "watch": "true", "timeoutSeconds": str(timeout)}
        with self.session.get(
            self.url + path, params=params, stream=True, timeout=(self.timeout, timeout + 10)
        ) as response:
            if response.status_code >= 300:
                raise KubeError(response.status_code, response.text)
            for line in response.iter_lines(chunk_size=None):
                if line:
                    yield json.loads(line)
