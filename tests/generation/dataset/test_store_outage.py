"""Transient store faults (issue 25, item 3): a real moto S3 server on a fixed port of
127.0.0.1 is stopped mid-operation and started again on the same port (moto keeps its
buckets in the process, so the store comes back with its objects, as a restarted
endpoint would); the operation must survive it. A store that never comes back fails
with one line once ``PVIT_STORE_RETRY_S`` has passed, and answers (404, 403, 412) are
never retried."""

import os
import socket
import threading
import time

import botocore.exceptions
import pytest

from generation.dataset import storage
from generation.dataset.storage import (
    Location,
    StoreUnreachable,
    WriteError,
    filesystem,
    transient,
)

BUCKET = "pvit-outage"


class Endpoint:
    """A moto S3 server that can be stopped and started again on its port."""

    def __init__(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                         verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()
        self.server = None


@pytest.fixture(scope="module")
def endpoint():
    end = Endpoint()
    end.start()
    # AWS_MAX_ATTEMPTS=1: botocore's own retries (~10 s per call against a refused
    # port) off, so what is measured here is storage.retrying's
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{end.port}",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1",
           storage.RETRY_ENV: "60"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._filesystems.clear()
    filesystem("s3").clear_instance_cache()
    storage._filesystems.clear()
    filesystem("s3").mkdir(BUCKET)
    try:
        yield end
    finally:
        storage._filesystems.clear()
        filesystem("s3").clear_instance_cache()
        storage._filesystems.clear()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if end.server is not None:
            end.stop()


def test_an_operation_survives_the_store_going_away_for_seconds(endpoint):
    where = Location(f"s3://{BUCKET}/survive")
    where.write_bytes(".render-records/shard-000000.tar.json", b"{}")
    where.write_bytes("manifest.json", b"{}")
    endpoint.stop()
    done = {}

    def the_flow_s_calls():
        # what issue 25 saw fail: the flow's cleanup of .render-records/ (a listing and
        # deletes), then a commit and a read-back, all while the store is down
        t0 = time.monotonic()
        try:
            where.delete_prefix(".render-records")
            where.write_bytes("journal/one.json", b"commit")
            done["listing"] = sorted(where.listing())
            done["read"] = where.read_bytes("journal/one.json")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            done["error"] = exc
        done["seconds"] = time.monotonic() - t0

    worker = threading.Thread(target=the_flow_s_calls)
    worker.start()
    time.sleep(6)                       # down for 6 s, then back on the same port
    assert worker.is_alive(), done      # still waiting it out, not failed
    endpoint.start()
    worker.join(timeout=60)
    assert "error" not in done, done
    assert done["seconds"] >= 6
    assert done["listing"] == ["manifest.json"] and done["read"] == b"commit"
    assert where.listing(".render-records") == {}


def test_a_store_that_never_comes_back_fails_with_one_line_after_the_bound(endpoint,
                                                                           monkeypatch):
    where = Location(f"s3://{BUCKET}/gone")
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    endpoint.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(WriteError) as info:
            where.write_bytes("manifest.json", b"{}")
        seconds = time.monotonic() - t0
        message = str(info.value)
        assert "\n" not in message and message.startswith(
            f"cannot write s3://{BUCKET}/gone/manifest.json: cannot reach the store: ")
        assert "(retried for 2 s, PVIT_STORE_RETRY_S)" in message
        assert 2 <= seconds < 6, seconds
        with pytest.raises(StoreUnreachable) as info:     # reads: the same, named
            where.read_bytes("manifest.json")
        assert str(info.value).startswith(f"s3://{BUCKET}/gone: cannot reach the store")
        monkeypatch.setenv(storage.RETRY_ENV, "0")        # 0: no retries at all
        t0 = time.monotonic()
        with pytest.raises(StoreUnreachable):
            where.listing()
        assert time.monotonic() - t0 < 1.5
    finally:
        endpoint.start()


def test_answers_are_not_retried(endpoint):
    where = Location(f"s3://{BUCKET}/answers")     # the budget is 60 s here
    t0 = time.monotonic()
    assert where.meta("missing.json") is None                        # 404
    with pytest.raises(FileNotFoundError):
        where.read_bytes("missing.json")
    assert where.create_bytes("lock", b"a") and not where.create_bytes("lock", b"b")  # 412
    with pytest.raises(WriteError, match="no such bucket"):
        Location("s3://no-such-bucket-here/x").makedirs()
    assert time.monotonic() - t0 < 5


def _client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_what_counts_as_transient():
    assert transient(_client_error(500, "InternalError"))
    assert transient(_client_error(503, "SlowDown"))
    assert transient(_client_error(429, "TooManyRequests"))
    assert not transient(_client_error(404, "NoSuchKey"))
    assert not transient(_client_error(403, "AccessDenied"))
    assert not transient(_client_error(412, "PreconditionFailed"))
    assert transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert transient(ConnectionResetError()) and transient(TimeoutError())
    wrapped = OSError(5, "wrapped by s3fs")          # s3fs's translation of a 503
    wrapped.__cause__ = _client_error(503, "ServiceUnavailable")
    assert transient(wrapped)
    missing = FileNotFoundError("no such key")
    missing.__cause__ = _client_error(404, "NoSuchKey")
    assert not transient(missing) and not transient(ValueError("bad json"))
