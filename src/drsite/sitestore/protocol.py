"""What the site-store server and client share: paths and limits. Errors travel as
``DrsiteError.to_dict()`` bodies with the class's ``http_status`` (the codec of
:mod:`drsite.core.errors`). Not responsible for transport or TLS."""

from __future__ import annotations

OBJECTS = "/store/v1/objects/"
LIST = "/store/v1/list"
ITEMS = "/replica/v1/items/"

MAX_OBJECT = 64 << 20          # largest object body accepted (packs are ~8-16 MiB)
MIN_BLOCK = 512
MAX_BLOCK = 64 << 20

BLOCKS_HEADER = "X-Blocks"
BYTES_READ_HEADER = "X-Bytes-Read"
POINT_HEADER = "X-Point-Id"
