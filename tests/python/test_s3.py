"""The test environment's S3 server (Garage) with a standard client: what the runtime's
storage layer relies on (put, get, ranged get, list with delimiter, multipart, delete)."""
import secrets

import boto3
import pytest
from botocore.config import Config

from conftest import setting


@pytest.fixture
def s3():
    return boto3.client(
        "s3",
        endpoint_url=setting("AWS_ENDPOINT_URL"),
        region_name=setting("AWS_REGION"),
        aws_access_key_id=setting("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=setting("AWS_SECRET_ACCESS_KEY"),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def test_put_get_ranged_list_delete(s3):
    bucket = setting("WEIR_TEST_BUCKET")
    prefix = f"py-{secrets.token_hex(4)}"
    body = bytes(range(256)) * 4
    s3.put_object(Bucket=bucket, Key=f"{prefix}/a/1", Body=body)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/a/2", Body=b"two")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/b", Body=b"bee")
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/a/1")["Body"].read() == body
    ranged = s3.get_object(Bucket=bucket, Key=f"{prefix}/a/1", Range="bytes=10-19")["Body"].read()
    assert ranged == body[10:20]
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", Delimiter="/")
    assert [p["Prefix"] for p in listing.get("CommonPrefixes", [])] == [f"{prefix}/a/"]
    assert [o["Key"] for o in listing.get("Contents", [])] == [f"{prefix}/b"]
    for key in (f"{prefix}/a/1", f"{prefix}/a/2", f"{prefix}/b"):
        s3.delete_object(Bucket=bucket, Key=key)
    assert s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("KeyCount", 0) == 0


def test_multipart_upload(s3):
    bucket = setting("WEIR_TEST_BUCKET")
    key = f"py-{secrets.token_hex(4)}/big"
    part = secrets.token_bytes(5 * 1024 * 1024)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
    parts = []
    for n in (1, 2):
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=n, Body=part)
        parts.append({"ETag": r["ETag"], "PartNumber": n})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": parts})
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == 2 * len(part)
    assert s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={len(part)}-{len(part) + 99}")["Body"].read() == part[:100]
    s3.delete_object(Bucket=bucket, Key=key)
