"""HTTP layer of the vault: FastAPI routers (operator and agent), request schemas, views of
rows, auth dependencies and the JSON error format ``{"code","class","message","hint"}``."""
