"""Real servers for remote shards, started by tests: the HTTP server of
tests/datamodules/shard_server.py in its own process (so a test can kill it), and moto's
S3-compatible server in a thread, with a bucket made through boto3. Used by
tests/datamodules/test_remote_shards.py and by the README's Remote shards block (test_readme.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SERVER = Path(__file__).parent / "datamodules" / "shard_server.py"
SECRET = "sdtrain-test-secret-9f4c1e7a"  # the S3 secret key the tests set: must appear in no log


class HttpServer:
    """shard_server.py in its own process on 127.0.0.1, serving `root` (see its docs for the
    paths that misbehave); `port` 0 takes a free one."""

    def __init__(self, root: Path, log: Path, port: int = 0) -> None:
        self.root, self.log = root, log
        cmd = [sys.executable, str(SERVER), str(root), "--port", str(port), "--log", str(log)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self, name: str) -> list[str]:
        """The logged requests whose path ends with `name`: 'GET /mode/name RANGE' lines."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if line.split()[1].endswith(name)]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class S3Server:
    """moto's S3 server on a free port of 127.0.0.1 (stopped by `stop`)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def env(self, config_dir: Path) -> dict[str, str]:
        """What a user's shell would hold: credentials, a region and the endpoint; AWS config
        files pointed at `config_dir`, which holds none (no real ~/.aws is read)."""
        return dict(
            AWS_ACCESS_KEY_ID="AKIDSDTRAINTEST",
            AWS_SECRET_ACCESS_KEY=SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_CONFIG_FILE=str(config_dir / "config"),
            AWS_SHARED_CREDENTIALS_FILE=str(config_dir / "credentials"),
        )

    def put_shards(self, shard_dir: Path, bucket: str, prefix: str) -> None:
        """Every .tar of `shard_dir` to s3://bucket/prefix/NAME, and a README.txt beside them."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="AKIDSDTRAINTEST",
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=bucket)
        for tar in sorted(shard_dir.glob("*.tar")):
            client.upload_file(str(tar), bucket, f"{prefix}/{tar.name}")
        client.put_object(Bucket=bucket, Key=f"{prefix}/README.txt", Body=b"not a shard")

    def stop(self) -> None:
        self.server.stop()
