"""Azure Blob Storage recovery-store backend (block blobs; Azure or Azurite)."""

from drsite.store.azure.store import DEFAULT_API_VERSION, AzureBlobObjectStore

__all__ = ["DEFAULT_API_VERSION", "AzureBlobObjectStore"]
