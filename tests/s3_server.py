"""A real S3-compatible server for tests and benchmarks: moto's standalone server as a subprocess on loopback.

The traffic is real HTTP through boto3, and the server can be killed (mid-batch) and started again on
the same port. Usage:

    with MotoServer() as server:
        client = make_s3_client(server.settings(bucket="b"), server.session())
        server.create_bucket("b")

`SilentServer` is the other kind of outage: an endpoint that accepts connections and never answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

REGION = "us-east-1"
DUMMY_KEY_ID = "AKIATESTTESTTESTTEST"
DUMMY_SECRET = "test-secret-not-a-real-one"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """An S3 endpoint on 127.0.0.1:port, and the settings and (dummy) credentials to reach it."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def session(self, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET) -> Any:
        """A boto3 session with explicit (dummy) credentials: nothing read from the developer's machine."""
        import boto3

        return boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=REGION)

    def settings(self, **changes) -> Any:
        """Settings pointing at this endpoint."""
        from settings import Settings

        return Settings(**{"s3_endpoint_url": self.url, "aws_region": REGION, **changes})


class MotoServer(Endpoint):
    """moto.server in a child process on 127.0.0.1:port; in-memory, so a restart starts empty."""

    def __init__(self, port: int | None = None, startup_timeout: float = 30.0):
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        """Start the server and wait until it answers HTTP."""
        if self.running:
            return self
        env = {**os.environ, "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID, "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET}
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)  # auth off until enforce_auth() turns it on
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(self.port), "-H", "127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited at start-up with code {self.proc.returncode}")
            try:
                httpx.get(f"{self.url}/moto-api/data.json", timeout=1.0)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.url} within {self.startup_timeout} s")

    def stop(self) -> None:
        """Kill the server at once (as a crash would), and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> MotoServer:
        """Kill and start again on the same port (with empty state)."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- helpers for tests -----------------------------------------------------------------
    def raw_client(self, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET, service: str = "s3") -> Any:
        """A plain boto3 client for set-up and inspection (independent of the code under test)."""
        return self.session(key_id, secret).client(service, endpoint_url=self.url, region_name=REGION)

    def create_bucket(self, bucket: str) -> None:
        self.raw_client().create_bucket(Bucket=bucket)

    def reset(self) -> None:
        """Forget every bucket, object and IAM user."""
        httpx.post(f"{self.url}/moto-api/reset", timeout=5.0).raise_for_status()

    def enforce_auth(self, on: bool = True) -> None:
        """Turn moto's IAM authentication on (signatures and policies checked) or off again."""
        count = "0" if on else "inf"
        httpx.post(f"{self.url}/moto-api/reset-auth", content=count.encode(), timeout=5.0).raise_for_status()

    def create_user(self, name: str, actions: list[str]) -> tuple[str, str]:
        """An IAM user allowed `actions` on every resource; returns (access key id, secret). Call with auth off."""
        import json

        iam = self.raw_client(service="iam")
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]


class SilentServer(Endpoint):
    """A hung endpoint on loopback: accepts every connection (and holds it open) but never sends a byte.

    Usage: `with SilentServer() as hung: ...`; once stopped, its port is free for a MotoServer.
    """

    def __init__(self, port: int | None = None):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port or 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        """How many connections it has accepted so far."""
        return len(self.accepted)

    def start(self) -> SilentServer:
        self.listener.listen(128)
        self._thread = threading.Thread(target=self._accept, name="silent-s3", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def stop(self) -> None:
        """Stop accepting and close every connection (the client sees them reset or closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.listener.close()
        for conn in self.accepted:
            conn.close()

    def __enter__(self) -> SilentServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
