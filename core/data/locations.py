"""Where an object lives: an s3:// bucket and key (a pure value type)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Location:
    """A bucket and key (or key prefix)."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """Parse `s3://bucket/key`; raises ValueError naming the bad URI."""
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"s3 URI without a bucket: {uri!r}")
        return cls(bucket=bucket, key=key)

    @property
    def uri(self) -> str:
        """Back to `s3://bucket/key`."""
        return f"s3://{self.bucket}/{self.key}"

    def child(self, *parts: str) -> S3Location:
        """A key below this one."""
        return S3Location(self.bucket, "/".join([self.key.rstrip("/"), *parts]).lstrip("/"))
