"""Where fct's state lives, without the orchestrator: object-store options from the AWS
environment, one-line errors for a store that is down or refuses the credentials, and the LanceDB
connection. A serving process (fct_assets/serving/contract.py) opens its table through this
module, and imports no Dagster.

Object storage (`s3://` in FCT_LANCEDB_URI or FCT_STORAGE_URI) is configured by the standard AWS
variables, read here once for both clients (LanceDB's and fsspec's): AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL (an S3-compatible endpoint such as MinIO or moto; plain http allowed),
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Generated state lives under the checkout's data/ (git-ignored) unless the environment says
# otherwise.
DATA_ROOT = Path(__file__).resolve().parents[2] / "data"  # the checkout's data/


def default_lancedb_uri() -> str:
    """The LanceDB database fct uses unless configured otherwise: FCT_LANCEDB_URI, else the
    checkout's data/lancedb."""
    return os.environ.get("FCT_LANCEDB_URI", str(DATA_ROOT / "lancedb"))


# Seconds and attempts before a request to an unreachable object store gives up: the clients'
# defaults retry for minutes (LanceDB: 10 retries over up to 180 s), which turns an endpoint that is
# down into a run that hangs instead of a one-line error.
OBJECT_STORE_TIMEOUT_S = 10
OBJECT_STORE_RETRIES = 2


def is_object_store(uri: str) -> bool:
    """Whether `uri` names an S3 bucket (s3://, s3a://) rather than a folder."""
    return uri.split("://", 1)[0].lower() in ("s3", "s3a") if "://" in uri else False


def s3_endpoint() -> str | None:
    """The S3 endpoint the environment names (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL), or None
    for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def lancedb_storage_options(uri: str) -> dict[str, str]:
    """LanceDB's `storage_options` for `uri` from the AWS environment ({} for a folder)."""
    if not is_object_store(uri):
        return {}
    options = {
        "connect_timeout": f"{OBJECT_STORE_TIMEOUT_S}s",
        "timeout": f"{6 * OBJECT_STORE_TIMEOUT_S}s",
        "client_max_retries": str(OBJECT_STORE_RETRIES),
        "client_retry_timeout": str(3 * OBJECT_STORE_TIMEOUT_S),
    }
    endpoint = s3_endpoint()
    if endpoint:
        options["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    if _s3_region():
        options["region"] = _s3_region()
    for env, key in (
        ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("AWS_SESSION_TOKEN", "aws_session_token"),
    ):
        if os.environ.get(env):
            options[key] = os.environ[env]
    return options


def fsspec_storage_options(uri: str) -> dict:
    """s3fs's options for `uri` (UPath(uri, **options)) from the AWS environment ({} otherwise)."""
    if not is_object_store(uri):
        return {}
    options: dict = {
        "config_kwargs": {
            "connect_timeout": OBJECT_STORE_TIMEOUT_S,
            "read_timeout": 6 * OBJECT_STORE_TIMEOUT_S,
            "retries": {"max_attempts": OBJECT_STORE_RETRIES, "mode": "standard"},
        },
    }
    if s3_endpoint():
        options["endpoint_url"] = s3_endpoint()
    if _s3_region():
        options["client_kwargs"] = {"region_name": _s3_region()}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["token"] = os.environ["AWS_SESSION_TOKEN"]
    return options


_REFUSED = re.compile(
    r"invalidaccesskeyid|signaturedoesnotmatch|signature we calculated does not match"
    r"|access key id you provided|accessdenied|access denied|forbidden|\b403\b|credential",
    re.I,
)
_UNREACHABLE = re.compile(
    # Not a bare "timeout": LanceDB's every error chain prints its retry_timeout setting.
    r"connection ?refused|could not connect|connecterror|tcp connect error|kind: connect\b"
    r"|timed ?out|unreachable|name or service not known|connection reset|broken pipe"
    r"|error sending request",  # reqwest's (LanceDB's HTTP client) when no response came back
    re.I,
)


def object_store_cause(err: BaseException) -> str | None:
    """Why a request to an object store failed, when the error says it: the endpoint refused the
    credentials, or could not be reached; None for any other error."""
    text = str(err)
    # s3fs turns a 403 into PermissionError with S3's message and no code.
    if isinstance(err, PermissionError) or _REFUSED.search(text):
        return (
            "the endpoint refused the credentials (check AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY)"
        )
    if _UNREACHABLE.search(text) or type(err).__name__ == "EndpointConnectionError":
        return "the endpoint is unreachable (is it running? AWS_ENDPOINT_URL names it)"
    return None


def object_store_error(uri: str, err: BaseException, doing: str) -> OSError:
    """One line for a failed request to the object store behind `uri`: what was being done, the
    endpoint, and why (unreachable, credentials refused, or the error's first line)."""
    why = object_store_cause(err)
    if why is None:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        why = " ".join(lines[0].split())[:300]
    return OSError(f"{doing} {uri}: object store {s3_endpoint() or 'AWS S3'}: {why}")


def connect_lancedb(uri: str, *, create: bool = True):
    """The LanceDB connection to `uri` (a folder, made when missing and `create`, or an
    object-store URI); a failure is one line naming the URI."""
    # Deferred: lancedb costs ~2 s of CPU; `fct lineage` and the code location open no table.
    import lancedb

    try:
        if "://" not in uri and create:
            Path(uri).mkdir(parents=True, exist_ok=True)
        return lancedb.connect(uri, storage_options=lancedb_storage_options(uri) or None)
    except Exception as err:  # OSError, lancedb's ValueError (multi-line), ...: one line
        if is_object_store(uri):
            raise object_store_error(uri, err, "cannot open LanceDB") from err
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"lancedb_uri {uri!r}: cannot open ({cause}); "
            "expected a writable folder or an object-store URI such as s3://bucket/fct"
        ) from err
