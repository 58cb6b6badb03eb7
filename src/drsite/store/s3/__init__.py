"""S3 recovery-store backend (any S3 service: AWS, SeaweedFS, MinIO, moto)."""

from drsite.store.s3.store import S3ObjectStore

__all__ = ["S3ObjectStore"]
