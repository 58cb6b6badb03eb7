"""Cloud recovery stores through the vault API: admin-only writes, credentials and keys never
returned (nor in events or logs), key rotation, groups pointing at a store, policy encryption,
and ``protect`` command arguments carrying the full spec (in-process app, ``TestClient``)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsite.replication.report import ItemState
from drsite.vault.testing import Agent, Harness, point, report, vm_info
from tests.integration.test_vault_api import cli_against

ACCESS = "AKIA-drsite-example-access"
SECRET = "drsite-secret-key-never-returned-0123"
SECRET2 = "drsite-rotated-secret-also-hidden-987"
S3_BODY: dict[str, Any] = {
    "name": "offsite", "kind": "s3",
    "config": {"bucket": "drsite-dr", "endpoint_url": "http://127.0.0.1:9000", "prefix": "prod"},
    "secret": {"access_key": ACCESS, "secret_key": SECRET}}
VMS = [vm_info("vm-1", "web1")]


@pytest.fixture(params=["sqlite", "postgresql"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    yield hh
    hh.close()


def err(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body: dict[str, Any] = r.json()
    if code is not None:
        assert body["code"] == code, body
    return body


def everything(h: Harness, extra: tuple[str, ...] = ()) -> str:
    """The text of every GET an operator can make here."""
    paths = ["/stores", "/stores/offsite", "/groups", "/policies", "/items?all=true", "/jobs",
             "/events?limit=1000", "/sites", "/hosts", "/alerts", "/health", *extra]
    out = [h.call("GET", p).text for p in paths]
    for job in h.entries("/jobs"):
        out.append(h.call("GET", f"/jobs/{job['id']}").text)
    return "\n".join(out)


def store_keys(h: Harness, name: str = "offsite") -> list[str]:
    from sqlalchemy import select

    from drsite.vault.db.models import Store

    with h.vault.db.read() as s:
        row = s.scalars(select(Store).where(Store.name == name)).one()
        return list((row.keys or {}).get("keys", {}).values())


def test_store_crud_roles_and_secrets(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ro, op = h.token("reader", "ro"), h.token("operator", "op")
    err(h.call("POST", "/stores", token=ro, json=S3_BODY), 403, "forbidden")
    err(h.call("POST", "/stores", token=op, json=S3_BODY), 403, "forbidden")
    assert h.ok("GET", "/stores", token=ro) == []
    for bad in ({"kind": "ftp"}, {"kind": "local"}, {"config": {}},
                {"config": {"bucket": "drsite-dr", "colour": 1}},
                {"secret": {"access_key": ACCESS}}, {"name": "../x"}):
        err(h.call("POST", "/stores", json={**S3_BODY, **bad}), 400, "invalid_input")
    r = h.call("POST", "/stores", json={**S3_BODY, "secret": "not-an-object"})
    assert r.status_code == 422 and SECRET not in r.text
    r = h.call("POST", "/stores", json={**S3_BODY, "config": {"bucket": 5}})
    assert r.status_code == 400 and SECRET not in r.text
    assert h.ok("GET", "/stores") == []

    st = h.ok("POST", "/stores", json=S3_BODY)
    assert st["name"] == "offsite" and st["kind"] == "s3" and st["encrypted"] is True
    assert st["config"]["bucket"] == "drsite-dr" and st["config"]["prefix"] == "prod/"
    assert st["secret_fields"] == ["access_key", "secret_key"]
    assert len(st["key_ids"]) == 1 and st["active_key_id"] == st["key_ids"][0]
    assert "secret" not in st and "keys" not in st
    err(h.call("POST", "/stores", json=S3_BODY), 409, "conflict")
    assert h.ok("GET", "/stores/offsite", token=ro) == st
    err(h.call("GET", "/stores/nope"), 404)

    # rotation: a new active key, the old one kept
    rot = h.ok("POST", "/stores/offsite/rotate-key")
    assert len(rot["key_ids"]) == 2 and rot["active_key_id"] not in st["key_ids"]
    assert st["active_key_id"] in rot["key_ids"]
    err(h.call("POST", "/stores/offsite/rotate-key", token=ro), 403)
    keys = store_keys(h)
    assert len(keys) == 2 and all(len(base64.b64decode(k)) == 32 for k in keys)

    # credentials replaced; the response still shows none
    up = h.ok("PUT", "/stores/offsite", json={"secret": {"access_key": ACCESS,
                                                         "secret_key": SECRET2},
                                              "config": {"region": "eu-west-1"}})
    assert up["config"]["region"] == "eu-west-1" and up["key_ids"] == rot["key_ids"]
    err(h.call("PUT", "/stores/offsite", json={"secret": {"access_key": ACCESS}}), 400)
    err(h.call("PUT", "/stores/offsite", token=op, json={"config": {}}), 403)

    # an unencrypted store has nothing to rotate
    h.ok("POST", "/stores", json={**S3_BODY, "name": "plain", "encryption": False})
    err(h.call("POST", "/stores/plain/rotate-key"), 409)
    assert h.call("DELETE", "/stores/plain").status_code == 204

    text = everything(h) + caplog.text
    for secret in (SECRET, SECRET2, ACCESS, *keys):
        assert secret not in text


def test_cloud_group_protect_args_carry_the_spec(h: Harness,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h.site("prim")
    h.site("sec")  # no agent, no agent store: the cloud store is the recovery store
    a: Agent = h.register("prim", "hv1")
    a.beat(vms=VMS)
    h.ok("POST", "/stores", json=S3_BODY)
    h.ok("POST", "/policies", json={"name": "enc", "frequency_s": 30, "encryption": True})
    # encryption needs an encrypted cloud store: refused for a site-store group
    err(h.call("POST", "/groups", json={"name": "g0", "site": "prim", "target_site": "sec",
                                        "policy": "enc"}), 400, "invalid_input")
    h.ok("POST", "/stores", json={**S3_BODY, "name": "clear", "encryption": False})
    err(h.call("POST", "/groups", json={"name": "g0", "site": "prim", "target_site": "sec",
                                        "policy": "enc", "store": "clear"}), 400)
    err(h.call("POST", "/groups", json={"name": "g0", "site": "prim", "target_site": "sec",
                                        "store": "nope"}), 404)
    assert h.ok("GET", "/groups") == []
    g = h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                      "store": "offsite"})
    assert g["store"] == "offsite"
    assert h.ok("GET", "/stores/offsite")["groups"] == ["g1"]
    err(h.call("PUT", "/groups/g1", json={"store": "clear", "policy": "enc"}), 400)
    assert h.ok("GET", "/groups/g1")["policy"] is None
    h.ok("PUT", "/groups/g1", json={"policy": "enc"})
    # a site-store group may not get an encrypting policy; a policy of a cloud group stays valid
    h.ok("POST", "/policies", json={"name": "plain", "frequency_s": 30})
    h.ok("POST", "/groups", json={"name": "g2", "site": "prim", "target_site": "sec",
                                  "policy": "plain"})
    err(h.call("PUT", "/policies/plain", json={"frequency_s": 30, "encryption": True}), 400)
    h.ok("PUT", "/policies/enc", json={"frequency_s": 60, "encryption": True})

    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    h.tick()
    h.tick()
    reply = a.beat(vms=VMS)
    (cmd,) = [c for c in reply["commands"] if c["kind"] == "protect"]
    args = cmd["args"]
    assert args["store_url"] == "cloud:offsite"
    spec = args["store"]
    assert spec["kind"] == "s3" and spec["name"] == "offsite"
    assert spec["secret"] == {"access_key": ACCESS, "secret_key": SECRET}
    assert spec["config"]["bucket"] == "drsite-dr"
    assert spec["active_key_id"] in spec["keys"] and set(spec["keys"].values()) == set(store_keys(h))
    assert args["settings"]["encryption"] is True
    from drsite.store.factory import StoreSpec

    StoreSpec.from_dict(spec)  # what the agent will accept

    item_id = str(out["item_id"])
    a.beat(vms=VMS, items=[{"item_id": item_id,
                            "report": report(item_id, "vm-1", "web1", ItemState.PROTECTED,
                                             last_point_time=h.clock.now()),
                            "new_points": [point(item_id, 1, h.clock.now())]}])
    assert a.result(cmd["command_id"], "succeeded").status_code == 200
    h.tick()
    job = h.job(out["job_id"])
    assert job["state"] == "succeeded", job
    assert "recovery store offsite" in job["tasks"][0]["message"]
    # a command that ended keeps no credential and no key in the vault's database
    from drsite.vault.db.models import Command

    with h.vault.db.read() as s:
        kept = s.get(Command, cmd["command_id"])
        assert kept is not None and kept.args["store"]["redacted"] is True
        assert SECRET not in str(kept.args) and not any(k in str(kept.args) for k in store_keys(h))

    # the store is in use: no delete, no move, and the group's store cannot change under items
    err(h.call("DELETE", "/stores/offsite"), 409, "conflict")
    err(h.call("PUT", "/stores/offsite", json={"config": {"bucket": "elsewhere"}}), 409)
    err(h.call("PUT", "/groups/g1", json={"store": None}), 409)

    # a rotation and new credentials reach the agent of the protected item (protect re-sent)
    rot = h.ok("POST", "/stores/offsite/rotate-key")
    h.ok("PUT", "/stores/offsite", json={"secret": {"access_key": ACCESS, "secret_key": SECRET2}})
    reply = a.beat(vms=VMS)
    sent = [c["args"]["store"] for c in reply["commands"] if c["kind"] == "protect"]
    assert len(sent) == 2 and all(c["item_id"] == item_id for c in reply["commands"])
    assert all(x["active_key_id"] == rot["active_key_id"] and len(x["keys"]) == 2 for x in sent)
    assert {x["secret"]["secret_key"] for x in sent} == {SECRET, SECRET2}
    h.tick()
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"

    text = everything(h, (f"/items/{item_id}", f"/items/{item_id}/points")) + caplog.text
    for secret in (SECRET, SECRET2, ACCESS, *store_keys(h)):
        assert secret not in text


def test_cli_store_commands(h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from drsite.cli.main import app

    cli_against(h, monkeypatch)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    secret_file = tmp_path / "s3.json"
    secret_file.write_text(json.dumps({"access_key": ACCESS, "secret_key": SECRET}))
    base = ["store", "create", "--kind", "s3", "--bucket", "drsite-dr", "--endpoint-url",
            "http://127.0.0.1:9000", "--json"]
    r = runner.invoke(app, [*base[:2], "offsite", *base[2:], "--secret-file", str(secret_file)])
    assert r.exit_code == 0, r.output
    created = json.loads(r.output)
    assert created["name"] == "offsite" and created["encrypted"] is True
    # no credentials anywhere: refused before calling the vault
    r = runner.invoke(app, [*base[:2], "other", *base[2:]])
    assert r.exit_code != 0 and h.ok("GET", "/stores")[0]["name"] == "offsite"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET2)
    r = runner.invoke(app, [*base[:2], "other", *base[2:], "--no-encryption"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["encrypted"] is False
    r = runner.invoke(app, ["store", "list", "--json"])
    assert [s["name"] for s in json.loads(r.output)] == ["offsite", "other"]
    r = runner.invoke(app, ["store", "rotate-key", "offsite", "--json"])
    assert len(json.loads(r.output)["key_ids"]) == 2
    r = runner.invoke(app, ["store", "update", "offsite", "--region", "eu-west-1",
                            "--credentials", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["config"]["region"] == "eu-west-1"
    r = runner.invoke(app, ["store", "show", "offsite"])
    assert r.exit_code == 0 and "eu-west-1" in r.output
    r = runner.invoke(app, ["store", "delete", "other", "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == {"deleted": "other"}
    assert [s["name"] for s in h.ok("GET", "/stores")] == ["offsite"]
    from drsite.store.factory import StoreSpec
    from drsite.vault.stores import get_store, row_spec

    with h.vault.db.read() as s:
        spec: StoreSpec = row_spec(get_store(s, "offsite"))
    assert spec.secret == {"access_key": ACCESS, "secret_key": SECRET2}
