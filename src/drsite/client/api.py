"""``VaultClient``: one method per operator route of ``docs/control-plane.md``.

Responsible for: HTTPS to the vault (verifying its certificate against the vault's CA), the
bearer token, and turning error responses back into the drsite error hierarchy (so the CLI can
exit by error class); reads the vault answered ``503 busy`` with a ``Retry-After`` (its database
failed for the moment) are asked again after that delay, a few times. Not responsible for:
retrying anything else (a write may have been done; callers decide) or rendering.
"""

from __future__ import annotations

import math
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from drsite.core import errors as E
from drsite.core.states import TERMINAL_JOB_STATES

PAGE_MAX = 1000  # the vault's largest page
# a read answered "503 busy" is asked again this many times, waiting the answer's Retry-After
# (bounded): a database failover or a stalled transaction lasts seconds, not minutes
BUSY_RETRIES = 4
BUSY_WAIT_S = (0.2, 5.0)
IDEMPOTENT = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class VaultConfig:
    url: str
    token: str | None = None
    ca_file: Path | None = None
    timeout: float = 30.0

    @staticmethod
    def from_env(url: str | None = None, token: str | None = None,
                 ca_file: Path | None = None) -> VaultConfig:
        """Explicit values win, then ``DRSITE_VAULT_URL`` / ``DRSITE_TOKEN`` /
        ``DRSITE_CA_FILE`` (``drsite up`` prints these)."""
        u = url or os.environ.get("DRSITE_VAULT_URL")
        if not u:
            raise E.InvalidInput("no vault URL", hint="Pass --vault URL or set DRSITE_VAULT_URL "
                                                      "(drsite up prints it).")
        t = token or os.environ.get("DRSITE_TOKEN")
        c = ca_file or (Path(os.environ["DRSITE_CA_FILE"]) if os.environ.get("DRSITE_CA_FILE")
                        else None)
        return VaultConfig(u.rstrip("/"), t, c)


def error_from_response(resp: httpx.Response) -> E.DrsiteError:
    """The drsite error an error answer of the vault stands for (the codec of
    :mod:`drsite.core.errors`; FastAPI's own ``{"detail": ...}`` bodies are unwrapped)."""
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = body.get("detail")
    if isinstance(detail, dict):
        body = detail
    message = body.get("message") or (detail if isinstance(detail, str) else "") \
        or f"HTTP {resp.status_code} from {resp.request.method} {resp.request.url.path}"
    if resp.status_code == 422 and not body.get("code"):
        message = f"request refused: {detail}"
    return E.from_dict({**body, "message": message}, http_status=resp.status_code)


def _code(resp: httpx.Response) -> str | None:
    """The error code of an error answer's JSON body, if it has one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None


def _retry_after(resp: httpx.Response) -> float:
    """The answer's ``Retry-After`` in seconds (1 when absent or not a number of seconds)."""
    try:
        s = float(resp.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0
    return s if math.isfinite(s) and s >= 0 else 1.0


def _check_finite(value: Any, where: str = "") -> None:
    """``InvalidInput`` for a NaN or infinite number in a request body (JSON cannot carry one:
    ``--frequency nan`` printed a traceback)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise E.InvalidInput(f"{where or 'a value'} is {value}: give a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, str(k))
    elif isinstance(value, list | tuple):
        for v in value:
            _check_finite(v, where)


class VaultClient:
    def __init__(self, config: VaultConfig) -> None:
        self.config = config
        verify: Any = ssl.create_default_context(cafile=str(config.ca_file)) if config.ca_file \
            else True
        headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self._http = httpx.Client(base_url=config.url + "/api/v1", verify=verify,
                                  headers=headers, timeout=config.timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json: Any = None,
              params: dict[str, Any] | None = None) -> Any:
        if json is not None:
            _check_finite(json)
        waited = 0.0
        for attempt in range(BUSY_RETRIES + 1):
            resp = self._send(method, path, json=json, params=params)
            # the vault's database failing for the moment: 503 busy with a Retry-After (a
            # route's own Busy, a resource held by a job, carries none and is not asked again)
            if not (resp.status_code == 503 and method in IDEMPOTENT and _code(resp) == "busy"
                    and "retry-after" in resp.headers):
                break
            if attempt == BUSY_RETRIES:
                err = error_from_response(resp)
                err.hint = (f"{err.hint} (asked {attempt + 1} times over {waited:.0f} s; "
                            "if it lasts, check the vault's log and its database)").lstrip()
                raise err
            pause = min(max(_retry_after(resp), BUSY_WAIT_S[0]), BUSY_WAIT_S[1])
            time.sleep(pause)
            waited += pause
        if resp.status_code >= 400:
            raise error_from_response(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        ctype = resp.headers.get("content-type", "")
        return resp.json() if "json" in ctype else resp.text

    def _send(self, method: str, path: str, *, json: Any,
              params: dict[str, Any] | None) -> httpx.Response:
        try:
            return self._http.request(method, path, json=json, params=params)
        except httpx.ConnectError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise E.AuthError(f"the vault's certificate is not trusted: {e}",
                                  hint="Pass --ca-file with the vault's CA (DATA/pki/ca.pem).") from e
            raise E.NetworkError(f"cannot reach the vault at {self.config.url}: {e}",
                                 hint="Is the vault running? Check --vault / DRSITE_VAULT_URL.") from e
        except httpx.TimeoutException as e:
            raise E.NetworkError(f"the vault did not answer in {self.config.timeout:g} s") from e

    # -- pages ---------------------------------------------------------------------------------

    def page(self, path: str, **params: Any) -> dict[str, Any]:
        """One page of a list endpoint: ``{"entries", "total", "limit", "next_cursor"}``
        (``params``: its filters, ``limit``, ``cursor``; None values are left out)."""
        return dict(self._call("GET", path, params={k: v for k, v in params.items()
                                                    if v is not None}))

    def collect(self, path: str, *, limit: int | None = None, **params: Any) -> list[dict[str, Any]]:
        """Every entry of a list endpoint (all pages), or the first ``limit`` of them."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            want = PAGE_MAX if limit is None else min(PAGE_MAX, limit - len(out))
            pg = self.page(path, **params, limit=want, cursor=cursor)
            out.extend(pg["entries"])
            cursor = pg.get("next_cursor")
            if not cursor or (limit is not None and len(out) >= limit):
                return out

    # -- resources -----------------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        return dict(self._call("GET", "/version"))

    def metrics(self) -> str:
        return str(self._call("GET", "/metrics"))

    def sites(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/sites"))

    def create_site(self, name: str, description: str = "") -> dict[str, Any]:
        return dict(self._call("POST", "/sites", json={"name": name, "description": description}))

    def registration_key(self, site: str, ttl_s: int = 3600) -> dict[str, Any]:
        return dict(self._call("POST", f"/sites/{site}/registration-keys", json={"ttl_s": ttl_s}))

    def set_store_host(self, site: str, host: str | None, *, force: bool = False) -> dict[str, Any]:
        """Give ``site``'s store role to ``host`` (id or name; None: to nobody) (admin)."""
        return dict(self._call("PUT", f"/sites/{site}/store-host",
                               json={"host": host, "force": force}))

    def hosts(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/hosts"))

    def host(self, host_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/hosts/{host_id}"))

    def reissue_host(self, host_id: str, ttl_s: int = 3600) -> dict[str, Any]:
        """A one-time key that replaces the certificate of ``host_id`` (admin)."""
        return dict(self._call("POST", f"/hosts/{host_id}/reissue", json={"ttl_s": ttl_s}))

    def vms(self, *, all_vms: bool = False) -> list[dict[str, Any]]:
        """The VM inventory (``all_vms``: also VMs no longer reported)."""
        return list(self._call("GET", "/vms", params={"all": "true"} if all_vms else None))

    def create_vm(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a VM on a host (``POST /vms``); returns its CreateVm job."""
        return dict(self._call("POST", "/vms", json=body))

    def import_vm(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a VM from disk images on its host (``POST /vms/import``); its ImportVm job."""
        return dict(self._call("POST", "/vms/import", json=body))

    def start_vm(self, vm_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/vms/{vm_id}/start"))

    def stop_vm(self, vm_id: str, *, force: bool = False, timeout_s: float = 60.0
                ) -> dict[str, Any]:
        return dict(self._call("POST", f"/vms/{vm_id}/stop",
                               json={"force": force, "timeout_s": timeout_s}))

    def delete_vm(self, vm_id: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/vms/{vm_id}"))

    def policies(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/policies"))

    def policy(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/policies/{name}"))

    def create_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/policies", json=policy))

    def update_policy(self, name: str, policy: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("PUT", f"/policies/{name}", json=policy))

    def delete_policy(self, name: str) -> None:
        self._call("DELETE", f"/policies/{name}")

    def groups(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/groups"))

    def group(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/groups/{name}"))

    def create_group(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/groups", json=group))

    def update_group(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change a group's ``policy``, ``match``, ``store`` or ``drill`` (fields given)."""
        return dict(self._call("PUT", f"/groups/{name}", json=changes))

    def group_points(self, name: str, *, all: bool = False) -> list[dict[str, Any]]:
        """A consistent group's group points, newest first (``all``: every barrier)."""
        return list(self._call("GET", f"/groups/{name}/points",
                               params={"all": "true"} if all else None))

    def delete_group(self, name: str) -> None:
        self._call("DELETE", f"/groups/{name}")

    def items(self, **filters: Any) -> list[dict[str, Any]]:
        """Every item matching ``filters`` (``all``, ``protection``, ``state``, ``health``,
        ``host``, ``site``, ``target_site``, ``group``, ``q``), all pages."""
        return self.collect("/items", **filters)

    def items_page(self, *, limit: int = 100, cursor: str | None = None,
                   **filters: Any) -> dict[str, Any]:
        return self.page("/items", limit=limit, cursor=cursor, **filters)

    def item_history(self, item_id: str) -> dict[str, Any]:
        """The VM's history across failover and failback, from any of its items."""
        return dict(self._call("GET", f"/items/{item_id}/history"))

    def item(self, item_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/items/{item_id}"))

    def protect(self, vm_id: str, group: str) -> dict[str, Any]:
        return dict(self._call("POST", "/items", json={"vm_id": vm_id, "group": group}))

    def unprotect(self, item_id: str, *, delete_points: bool = False) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/items/{item_id}",
                               params={"delete_points": "true"} if delete_points else None))

    def resync(self, item_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/items/{item_id}/resync"))

    def points(self, item_id: str, **filters: Any) -> list[dict[str, Any]]:
        """The item's whole recovery-point catalogue, oldest first (``since``,
        ``consistency``)."""
        return self.collect(f"/items/{item_id}/points", **filters)

    def points_page(self, item_id: str, *, limit: int = 100, cursor: str | None = None,
                    **filters: Any) -> dict[str, Any]:
        return self.page(f"/items/{item_id}/points", limit=limit, cursor=cursor, **filters)

    def verify(self, item_id: str, *, point: str | None = None,
               all_points: bool = False) -> dict[str, Any]:
        return dict(self._call("POST", f"/items/{item_id}/verify",
                               json={"point": point, "all": all_points}))

    def drills(self, plan: str | None = None, *, group: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"plan": plan, "group": group}.items() if v}
        return list(self._call("GET", "/drills", params=params or None))

    def drill(self, drill_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/drills/{drill_id}"))

    def run_drill(self, plan: str | None = None, *, group: str | None = None,
                  **overrides: Any) -> dict[str, Any]:
        """Start a drill of a plan, or of a protection group (``group=``)."""
        target = {"plan": plan} if plan is not None else {"group": group}
        return dict(self._call("POST", "/drills", json={**target, **overrides}))

    def set_group_drill(self, group: str, drill: dict[str, Any] | None) -> dict[str, Any]:
        """Give a protection group a drill schedule (None: no drill)."""
        return dict(self._call("PUT", f"/groups/{group}", json={"drill": drill}))

    def verification(self, item_id: str, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/items/{item_id}/verifications/{job_id}"))

    def jobs(self, *, state: str | None = None, kind: str | None = None,
             limit: int | None = 100, **filters: Any) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs (None: all) matching the filters (``item``, ``since``)."""
        return self.collect("/jobs", limit=limit, state=state, kind=kind, **filters)

    def jobs_page(self, *, limit: int = 100, cursor: str | None = None,
                  **filters: Any) -> dict[str, Any]:
        return self.page("/jobs", limit=limit, cursor=cursor, **filters)

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/jobs/{job_id}/cancel") or {})

    def alerts(self, **filters: Any) -> list[dict[str, Any]]:
        """Every alert matching ``filters`` (``state``, ``kind``, ``severity``, ``since``)."""
        return self.collect("/alerts", **filters)

    def alerts_page(self, *, limit: int = 100, cursor: str | None = None,
                    **filters: Any) -> dict[str, Any]:
        return self.page("/alerts", limit=limit, cursor=cursor, **filters)

    def events_page(self, *, limit: int = 100, cursor: str | None = None,
                    **filters: Any) -> dict[str, Any]:
        """One page of the event trail, newest first (``kind``, ``subject``, ``since``)."""
        return self.page("/events", limit=limit, cursor=cursor, **filters)

    def controller(self) -> dict[str, Any]:
        """Which vault process is the controller (``{"lease", "role", "this_process"}``)."""
        return dict(self._call("GET", "/controller"))

    def vault_state(self) -> dict[str, Any]:
        """The vault's role in a pair (``{"role", "timeline", "epoch", "url", "peer_url"}``)."""
        return dict(self._call("GET", "/vault/state"))

    def promote(self, *, force: bool = False) -> dict[str, Any]:
        """Make the vault this client talks to (a standby) the active one (admin); ``force``
        even while its peer answers as the active one."""
        return dict(self._call("POST", "/vault/promote", params={"force": "true"} if force
                               else None))

    def ack_alert(self, alert_id: str) -> None:
        self._call("POST", f"/alerts/{alert_id}/ack")

    def events(self, *, kind: str | None = None, subject: str | None = None,
               limit: int | None = 200) -> list[dict[str, Any]]:
        """The event trail, newest first (``kind``: item, job, host, …; ``subject``: its id),
        the newest ``limit`` events (None: all pages)."""
        return self.collect("/events", limit=limit, kind=kind, subject=subject)

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/health"))

    def audit(self, *, limit: int = 100, since: float | None = None, actor: str | None = None,
              before: int | None = None, cursor: str | None = None,
              outcome: str | None = None) -> dict[str, Any]:
        """One page of the audit trail, newest first: ``{"entries", "total", "next_cursor",
        "next_before"}`` (admin)."""
        return self.page("/audit", limit=limit, since=since, actor=actor, before=before,
                         cursor=cursor, outcome=outcome)

    def tokens(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/tokens"))

    def create_token(self, name: str, role: str) -> dict[str, Any]:
        return dict(self._call("POST", "/tokens", json={"name": name, "role": role}))

    def delete_token(self, name: str) -> None:
        self._call("DELETE", f"/tokens/{name}")

    # -- failover and recovery plans -------------------------------------------------------------

    def item_action(self, item_id: str, action: str, **body: Any) -> dict[str, Any]:
        """Start a failover action on one item (a :class:`~drsite.core.actions.FailoverAction`:
        ``test-failover``, ``cleanup-test-failover``, ``planned-failover``,
        ``unplanned-failover``, ``commit``, ``cancel``, ``change-point``, ``reprotect``,
        ``failback``); returns its job."""
        return dict(self._call("POST", f"/items/{item_id}/failover/{action}",
                               json={k: v for k, v in body.items() if v is not None}))

    def failovers(self, item_id: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/items/{item_id}/failovers" if item_id else "/failovers"))

    def failover(self, failover_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/failovers/{failover_id}"))

    def plans(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/plans"))

    def plan(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/plans/{name}"))

    def apply_plans(self, plans: list[dict[str, Any]], *, dry_run: bool = False,
                    prune: bool = False) -> dict[str, Any]:
        return dict(self._call("POST", "/plans", json={"plans": plans, "dry_run": dry_run,
                                                        "prune": prune}))

    def delete_plan(self, name: str) -> None:
        self._call("DELETE", f"/plans/{name}")

    def plan_action(self, name: str, action: str, **body: Any) -> dict[str, Any]:
        return dict(self._call("POST", f"/plans/{name}/{action}",
                               json={k: v for k, v in body.items() if v is not None}))

    def resume_job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/jobs/{job_id}/resume"))

    def network_mappings(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/network-mappings"))

    def set_network_mapping(self, mapping: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("PUT", "/network-mappings", json=mapping))

    def delete_network_mapping(self, mapping_id: int) -> None:
        self._call("DELETE", f"/network-mappings/{int(mapping_id)}")

    # -- waiting -------------------------------------------------------------------------------

    def wait_job(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5,
                 on_update: Any = None) -> dict[str, Any]:
        """Poll a job until it ends (succeeded, failed, cancelled); returns the final job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job.get("state") in TERMINAL_JOB_STATES:
                return job
            if time.monotonic() > deadline:
                raise E.TransientError(f"job {job_id} still {job.get('state')} after {timeout:g} s",
                                       hint=f"Follow it with 'drsite jobs show {job_id}'.")
            time.sleep(poll)

    # --- cloud stores -------------------------------------------------------------------------
    # credentials go in request bodies only; no response carries them (the vault redacts)

    def stores(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/stores"))

    def store(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/stores/{name}"))

    def create_store(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/stores", json=body))

    def update_store(self, name: str, *, config: dict[str, Any] | None = None,
                     secret: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {k: v for k, v in {"config": config, "secret": secret}.items() if v is not None}
        return dict(self._call("PUT", f"/stores/{name}", json=body))

    def delete_store(self, name: str) -> None:
        self._call("DELETE", f"/stores/{name}")

    def rotate_store_key(self, name: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/stores/{name}/rotate-key"))

    def rekey_store(self, name: str) -> dict[str, Any]:
        """Start re-encrypting the store's old objects under its active key; returns the job."""
        return dict(self._call("POST", f"/stores/{name}/rekey"))

    def set_group_store(self, group: str, store: str | None) -> dict[str, Any]:
        return dict(self._call("PUT", f"/groups/{group}", json={"store": store}))
