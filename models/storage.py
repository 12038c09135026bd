"""Where images live: object keys made from the job id, and two backends behind one interface.

`file:///path` keeps objects in a local folder; `s3://bucket/prefix` keeps them in any
S3-compatible store through boto3 (AWS S3, MinIO, SeaweedFS, R2: set SDQUEUE_S3_ENDPOINT_URL).
Uploads, a worker's one call an image, go through MinIO's client, with boto3's endpoint and
credentials: a PUT of 60 KB cost it 0.5 ms of CPU against boto3's 1.1 (bench/put.py).
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from models.errors import ConfigError, StorageError, StorageUnavailable


def object_key_for(job_id: str, index: int, claim: int) -> str:
    """The key of image `index` of job `job_id` as made by its claim number `claim` (the lease
    token): a stale claim never writes over the objects of a newer one."""
    return f"images/{job_id}/{claim}/{index}.png"


def input_key_for(job_id: str) -> str:
    """The key of a job's img2img input image, stored as uploaded."""
    return f"inputs/{job_id}/input"


def mask_key_for(job_id: str) -> str:
    """The key of an inpainting job's mask, stored as uploaded."""
    return f"inputs/{job_id}/mask"


def depth_key_for(job_id: str) -> str:
    """The key of a depth-to-image job's own depth map, stored as uploaded."""
    return f"inputs/{job_id}/depth"


# The jobs columns holding the keys of a job's inputs: what goes with the job.
INPUT_KEY_COLUMNS = ("input_key", "mask_key", "depth_key")


class Storage(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def location(self, key: str) -> str:
        """Where a person finds the object: a path or an s3:// URL."""
        ...

    def ping(self) -> None:
        """Raise a StorageError unless the store answers (readiness checks)."""
        ...


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StorageError(f"object key {key!r} leaves the storage folder")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half an object.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"object {key!r} not found in {self.url}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def location(self, key: str) -> str:
        return str(self._path(key))

    def ping(self) -> None:
        """Raise StorageUnavailable unless the folder is there (made if missing) and writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"storage folder {self.url} cannot be made ({exc.strerror or exc})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"storage folder {self.url} is not writable")


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str = "us-east-1"):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._client: Any = None
        self._session: Any = None
        self._minio: Any = None
        self._opening = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use: importing boto3 and making a client take ~0.2 s,
        which a command that only reads a job (`sdqueue status`: image locations are plain strings)
        does not pay."""
        with self._opening:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # A session of its own: the default session caches credentials and is not thread-safe.
                self._session = boto3.session.Session()
                self._client = self._session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    config=Config(
                        signature_version="s3v4",
                        s3={"addressing_style": "path"} if self.endpoint_url else {},
                        # A few quick tries here; a longer outage is waited out by the caller (models/outage.py).
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=5,
                        read_timeout=30,
                    ),
                )
            return self._client

    @property
    def minio(self) -> Any:
        """MinIO's client for PUTs and GETs, made on first use: the endpoint boto3 resolved
        (SDQUEUE_S3_ENDPOINT_URL, or AWS's for the region), and the credentials of boto3's chain,
        refreshed as boto3 refreshes them. Per object it costs a fraction of boto3's CPU (a 60 KB
        PUT: 0.49 ms against 1.13, bench/put.py; an export's GETs: see the README)."""
        client = self.client
        with self._opening:
            if self._minio is None:
                self._minio = _minio_client(client.meta.endpoint_url, self.region, self._session.get_credentials())
            return self._minio

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, what: str, exc: Exception) -> StorageError:
        """StorageUnavailable when the server cannot be reached or answers with a server error."""
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
        from minio.error import S3Error, ServerError
        from urllib3.exceptions import HTTPError

        if isinstance(exc, (ConnectionError, HTTPClientError, HTTPError)):
            return StorageUnavailable(f"{what} {self.url}: the S3 server cannot be reached ({exc})")
        status, code = 0, ""
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = exc.response.get("Error", {}).get("Code", "")
        elif isinstance(exc, S3Error):
            status, code = exc.response.status, exc.code or ""
        elif isinstance(exc, ServerError):
            status = exc.status_code
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
            return StorageUnavailable(f"{what} {self.url}: the S3 server is unavailable ({exc})")
        return StorageError(f"{what} {self.url} failed: {exc}")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self.minio.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data), content_type=content_type)
        except Exception as exc:
            raise self._error(f"upload of {key!r} to", exc) from exc

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self.minio.get_object(self.bucket, self._key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        except Exception as exc:
            if isinstance(exc, S3Error) and exc.code == "NoSuchKey":
                raise StorageError(f"object {key!r} not found in {self.url}") from None
            raise self._error(f"download of {key!r} from", exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(f"checking {key!r} in", exc) from exc
        except Exception as exc:
            raise self._error(f"checking {key!r} in", exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._error(f"deleting {key!r} from", exc) from exc

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def presigned_url(self, key: str, expires: int) -> str:
        """A URL anyone holding it may GET the object from for `expires` seconds. Signing is local:
        nothing is sent, so a missing object is found only by whoever follows the URL."""
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires)
        except Exception as exc:  # no credentials to sign with
            raise self._error(f"signing a URL for {key!r} in", exc) from exc

    def ping(self) -> None:
        """One cheap call (HEAD of the bucket): raises StorageUnavailable (or StorageError: no such
        bucket, no access) unless the store answers."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._error("checking the bucket of", exc) from exc


def _minio_client(endpoint_url: str, region: str, credentials: Any) -> Any:
    """MinIO's client on boto3's endpoint, signing with boto3's credentials (None: anonymous)."""
    import certifi
    import urllib3
    from minio import Minio
    from minio.credentials import Credentials
    from minio.credentials.providers import Provider

    class FromBoto3(Provider):
        def retrieve(self) -> Credentials:
            frozen = credentials.get_frozen_credentials()
            return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    endpoint = urlparse(endpoint_url)
    http = urllib3.PoolManager(
        # As boto3's client above: a few quick tries here; a longer outage is waited out by the caller.
        timeout=urllib3.Timeout(connect=5, read=30), maxsize=16,
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("AWS_CA_BUNDLE") or certifi.where())
    return Minio(endpoint.netloc, secure=endpoint.scheme == "https", region=region, http_client=http,
                 credentials=FromBoto3() if credentials is not None else None)


def open_storage(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1") -> Storage:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region)
    raise ConfigError(f"SDQUEUE_STORAGE_URL={url!r}: scheme must be file:// or s3://")
