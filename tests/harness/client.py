"""A minimal JSON client for the Kubernetes REST API (dicts in, dicts out), on ``requests``.

The kubelet harness uses it instead of the ``kubernetes`` package: no model classes, no
date parsing, and watches that end on the server's ``timeoutSeconds``.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import requests

Body = dict[str, Any]


class KubeError(RuntimeError):
    """A non-2xx answer of the API server."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


def _abort(response: requests.Response) -> None:
    """Unblock a thread reading a streamed response: shut its socket down.

    ``response.close()`` from another thread blocks until the reader returns.
    """
    connection = getattr(response.raw, "connection", None)
    with contextlib.suppress(OSError, AttributeError):
        connection.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]


class KubeClient:
    """A synchronous client for one API server and one user (a bearer token)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # never through a proxy: the server is on 127.0.0.1
        self._watches: set[requests.Response] = set()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        """Close the session and abort open watches (their readers see an error)."""
        for response in list(self._watches):
            _abort(response)
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

    def watch(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        timeout: int = 60,
        on_open: Callable[[], None] | None = None,
    ) -> Iterator[Body]:
        """Watch events until the server ends the stream after ``timeout`` seconds.

        ``on_open`` is called once the server has answered: from then on, no change is lost.
        """
        query = {**(params or {}), "watch": "true", "timeoutSeconds": str(timeout)}
        with self.session.get(
            self.url + path, params=query, stream=True, timeout=(self.timeout, timeout + 10)
        ) as response:
            if response.status_code >= 300:
                raise KubeError(response.status_code, response.text)
            self._watches.add(response)
            try:
                if on_open is not None:
                    on_open()
                # chunk_size=None: lines as they arrive, not once 512 bytes are buffered.
                for line in response.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                    if line:
                        yield json.loads(line)
            finally:
                self._watches.discard(response)
