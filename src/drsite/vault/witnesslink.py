"""A vault's side of the witness (``vault/witness.py``; ``vault serve --witness URL
--auto-promote-after N``): the active vault's renewals (rule 2's "reaches the witness"), and
the standby's automatic promotion (rule 1).

**Renewal** (:class:`WitnessLink`): "I am URL at epoch E" every ``lease_s / 3`` (the pair's
fence loop, ``vault/pairfence.py``, sends it). A renewal the witness took confirms this vault
for ``lease_s`` from when it was *sent* (:attr:`WitnessLink.confirmed_until`); an answer naming
a newer holder or epoch is returned as ``fenced`` (rule 3: the fence fences the vault).

**Automatic promotion** (:class:`AutoPromote`, a standby vault, every second): while its peer
answers, nothing. When the peer has been silent ``after_s - lease_s`` seconds the standby
becomes a **candidate** (its ``/vault/state`` says so, and a candidate's answer no longer
confirms the active vault: the active then needs the witness to write). When the peer has
been silent ``after_s`` seconds *and* the vault has been a candidate for ``lease_s`` (so any
confirmation the active drew from this standby has expired), it claims at the witness with an
epoch above both its database's and the witness's, and only if granted promotes (the same
procedure as ``drsite vault promote``, the lease taken at the claimed epoch at least). The
witness grants only when the holder has not renewed for ``after_s`` > ``lease_s`` seconds: by
then the old active, cut off from both, has stopped writing.

Responsible for: talking to the witness and when to claim. Not responsible for: the record
(the witness), the promotion itself (``context.Vault.promote``).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class WitnessLink:
    """HTTPS calls to the witness (TLS checked against the pair's CA, the shared token)."""

    def __init__(self, url: str, token: str, ssl_context: ssl.SSLContext | None, *,
                 me: str, lease_s: float, timeout_s: float = 2.0,
                 clock: Clock = time.monotonic) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._ctx = ssl_context
        self.me = me.rstrip("/")
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self._clock = clock
        self.confirmed_until = 0.0  # monotonic: the last renewal the witness took + lease_s
        # the epoch a claim was granted at: renewals carry it at least (the promotion's lease,
        # taken at that epoch, is a write that passes the fence first)
        self.granted_epoch = 0
        self.last_answer: dict[str, Any] | None = None

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            r = httpx.post(self.url + path, json=body, verify=self._ctx or True,
                           headers={"Authorization": f"Bearer {self._token}"},
                           timeout=self.timeout_s)
        except httpx.HTTPError as e:
            log.debug("the witness %s does not answer: %s", self.url, type(e).__name__)
            return None
        if r.status_code != 200:
            log.error("the witness %s refused %s: %s %s", self.url, path, r.status_code,
                      r.text[:300])
            return None
        try:
            out = r.json()
        except ValueError:
            return None
        return out if isinstance(out, dict) else None

    def state(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(self.url + "/witness/state", verify=self._ctx or True,
                          timeout=self.timeout_s)
            out = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return out if isinstance(out, dict) else None

    def renew(self, epoch: int) -> dict[str, Any] | None:
        """Renew as the holder at ``epoch``. The witness's answer (``ok`` True: this vault is
        confirmed from when the renewal was sent; ``fenced`` True: a newer holder or epoch is
        recorded), or None when it does not answer (the confirmation runs out)."""
        sent = self._clock()
        epoch = max(epoch, self.granted_epoch)
        out = self._post("/witness/renew", {"holder": self.me, "epoch": epoch,
                                            "lease_s": self.lease_s})
        self.last_answer = out
        if out is not None and out.get("ok") is True:
            self.confirmed_until = max(self.confirmed_until, sent + self.lease_s)
        return out

    def confirmed(self) -> bool:
        return self._clock() < self.confirmed_until

    def claim(self, epoch: int, after_s: float, *, force: bool = False) -> dict[str, Any] | None:
        """Claim the pair at ``epoch`` (granted: recorded as the holder, and confirmed as a
        renewal would be)."""
        sent = self._clock()
        out = self._post("/witness/claim", {"holder": self.me, "epoch": epoch,
                                            "lease_s": self.lease_s, "after_s": after_s,
                                            "force": force})
        if out is not None and out.get("granted") is True:
            self.granted_epoch = max(self.granted_epoch, epoch)
            self.confirmed_until = max(self.confirmed_until, sent + self.lease_s)
        return out


class AutoPromote:
    """The standby's rule 1 (see the module docstring). ``peer_answers()``: whether the peer
    vault answered ``/vault/state`` now; ``own_epoch()``: the lease epoch in this vault's
    database; ``promote(epoch)``: promote, taking the lease at ``epoch`` at least."""

    def __init__(self, witness: WitnessLink, *, after_s: float, lease_s: float,
                 peer_answers: Callable[[], bool], own_epoch: Callable[[], int],
                 promote: Callable[[int], None], clock: Clock = time.monotonic) -> None:
        if after_s <= lease_s:
            raise ValueError("after_s must be above lease_s")
        self.witness = witness
        self.after_s = after_s
        self.lease_s = lease_s
        self._peer_answers = peer_answers
        self._own_epoch = own_epoch
        self._promote = promote
        self._clock = clock
        self._heard = clock()  # counted from start: a standby never promotes at once
        self.candidate_since: float | None = None
        self.last_claim: dict[str, Any] | None = None

    @property
    def candidate(self) -> bool:
        return self.candidate_since is not None

    def step(self) -> bool:
        """One look; whether this vault promoted."""
        now = self._clock()
        if self._peer_answers():
            self._heard = now
            if self.candidate_since is not None:
                log.info("the peer vault answers again: no longer a candidate for promotion")
            self.candidate_since = None
            return False
        now = self._clock()
        silent = now - self._heard
        if silent < self.after_s - self.lease_s:
            return False
        if self.candidate_since is None:
            self.candidate_since = now
            log.warning("the peer vault has not answered for %.1f s: this standby is a "
                        "candidate for promotion (claims at the witness after %.0f s)", silent,
                        self.after_s)
        if silent < self.after_s or now - self.candidate_since < self.lease_s:
            return False
        seen = self.witness.state()
        if seen is None:
            log.warning("the peer vault is silent for %.1f s but the witness does not answer "
                        "either: no promotion (a majority is needed)", silent)
            return False
        epoch = max(self._own_epoch(), int(seen.get("epoch") or 0)) + 1
        out = self.witness.claim(epoch, self.after_s)
        self.last_claim = out
        if out is None or out.get("granted") is not True:
            log.warning("claim at the witness refused: %s", (out or {}).get("why", "no answer"))
            return False
        log.warning("the witness granted this vault epoch %d (the peer silent for %.1f s): "
                    "promoting", epoch, silent)
        self._promote(epoch)
        return True
