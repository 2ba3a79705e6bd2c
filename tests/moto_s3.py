"""A moto S3 server on 127.0.0.1 for tests of stages whose outputs live on a bucket (the
same setup as ``tests/generation/dataset/test_object_storage.py``'s ``s3_env``): a real
S3 API over HTTP, so s3fs, retries and conditional writes run as against a store.

A module of its own, not a conftest: test files of several directories import it."""

import logging
import os
from contextlib import contextmanager


@contextmanager
def running_s3(bucket: str):
    """Start the server, make ``bucket``, point botocore (here and in subprocesses) at it;
    yields the environment for subprocesses."""
    from moto.server import ThreadedMotoServer

    from generation.dataset import storage

    # its request log would land in the output the tests read (one line per request)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._filesystems.clear()
    storage.filesystem("s3").clear_instance_cache()     # none made for another endpoint
    storage._filesystems.clear()
    storage.filesystem("s3").mkdir(bucket)
    try:
        yield {**os.environ, **env}
    finally:
        storage._filesystems.clear()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def keys(url: str) -> set[str]:
    """Every object under ``url`` (``s3://bucket/prefix``), relative to it."""
    from generation.dataset.storage import Location
    where = Location(url)
    return {key[len(where.root) + 1:] for key in where.fs.find(where.root)}
