"""What each listener can verify, from its config and its credential store.

Glue between config, the credential store and the pure policy function:
the CLI (`check`, `negotiate`) and the proxy ask the same questions here,
so what `negotiate` prints is what a live listener does.
"""

from __future__ import annotations

import ipaddress
from concurrent.futures import Executor
from dataclasses import dataclass, field

from authgate.atrest.envelope import Keyring
from authgate.config import BackendMode, Config, Listener, PasswordStorage
from authgate.credentials.base import CredentialStore
from authgate.credentials.store import StoreOffer, UserStore
from authgate.policy import Decision, Withheld, decide
from authgate.sasl import MECHANISMS


@dataclass(frozen=True)
class ListenerOffer:
    """The store-side limit on a listener's mechanisms."""

    listener: Listener
    store: StoreOffer
    # The policy's answers so far, by (exempt client?, TLS?): the policy
    # function reads the client's address for its exemption alone, so a
    # listener has at most four answers; a session needs one per TLS state.
    _decisions: dict[tuple[bool, bool], Decision] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def verifiable(self) -> tuple[str, ...]:
        return self.store.mechanisms

    def explain(self, reason: Withheld, mechanism: str) -> str:
        """Why `mechanism` is withheld, in words an admin can act on."""
        if reason is Withheld.STORE_CANNOT_VERIFY:
            return self.store.reasons.get(mechanism, str(reason.value))
        return str(reason.value)

    def decide(
        self, client: str | ipaddress.IPv4Address | ipaddress.IPv6Address, *, tls: bool
    ) -> Decision:
        policy = self.listener.policy
        key = (client in policy.exempt, tls)
        decision = self._decisions.get(key)
        if decision is None:
            decision = decide(policy, client, tls=tls, verifiable=self.verifiable)
            self._decisions[key] = decision
        return decision


def listener_offer(
    listener: Listener, store: CredentialStore | None, realm: str, *, oauth: bool = False
) -> ListenerOffer:
    """`realm` is the DIGEST-MD5 realm the listener announces (our hostname):
    stored {DIGEST-MD5} hashes serve only that realm. `oauth`: an [oauth]
    token verifier is configured (OAUTHBEARER and XOAUTH2 need it)."""
    order = listener.policy.mechanisms
    if listener.backend.mode is BackendMode.RELAY:
        # The backend verifies everything, bearer tokens included.
        storage = listener.backend.password_storage
        if storage is PasswordStorage.ONE_WAY:
            return ListenerOffer(listener, StoreOffer.password_only(order, ONE_WAY_REASON))
        # The backend verifies; but a -PLUS mechanism binds to the client's
        # TLS session, which ends here, so the backend could never check it.
        # EXTERNAL neither: the client's certificate is shown to us only.
        plus = [m for m in order if MECHANISMS[m].channel_binding or MECHANISMS[m].external]
        return ListenerOffer(
            listener,
            StoreOffer(
                mechanisms=tuple(m for m in order if m not in plus),
                dropped={m: () for m in plus},
                dropped_count={m: 0 for m in plus},
                reasons={m: RELAY_BINDING_REASON for m in plus},
            ),
        )
    if store is None:
        raise ValueError(f"listener {listener.name!r} verifies users but has no store")
    # Bearer tokens are the token verifier's, EXTERNAL the certificate's:
    # not the store's, so asked apart.
    bearer = [m for m in order if m in MECHANISMS and MECHANISMS[m].bearer]
    external = [m for m in order if m in MECHANISMS and MECHANISMS[m].external]
    rest = tuple(m for m in order if m not in bearer and m not in external)
    offer = _with_bearer(order, bearer, oauth, store.offerable(rest, realm=realm))
    if external:
        offer = _with_bearer(
            order, external, listener.client_cert is not None, offer, NO_CERT_REASON
        )
    return ListenerOffer(listener, offer)


def _with_bearer(
    order: tuple[str, ...],
    bearer: list[str],
    oauth: bool,
    store: StoreOffer,
    reason: str = "",
) -> StoreOffer:
    """The store's offer with the admin's OAUTHBEARER / XOAUTH2 (or
    EXTERNAL) put back in their places when what verifies them is configured
    (`oauth`), else listed as dropped for `reason`."""
    if not bearer:
        return store
    if not oauth:
        why = reason or NO_OAUTH_REASON
        return StoreOffer(
            store.mechanisms,
            {**store.dropped, **{m: () for m in bearer}},
            {**store.dropped_count, **{m: 0 for m in bearer}},
            {**store.reasons, **{m: why for m in bearer}},
        )
    kept = set(store.mechanisms) | set(bearer)
    mechanisms = tuple(m for m in order if m in kept)
    return StoreOffer(mechanisms, store.dropped, store.dropped_count, store.reasons)


NO_OAUTH_REASON = "no [oauth] token verifier is configured"
NO_CERT_REASON = "the listener asks for no client certificates (client_ca)"


ONE_WAY_REASON = "the backend keeps passwords as one-way hashes"
RELAY_BINDING_REASON = "channel binding cannot be relayed: the client's TLS ends at authgate"


def load_store(
    config: Config, executor: Executor | None = None, keyring: Keyring | None = None
) -> CredentialStore | None:
    """The users file, or the directory; `executor` runs slow hashing and
    binds off the event loop, `keyring` opens a users file encrypted at rest."""
    if config.directory is not None:
        from authgate.credentials.directory import Directory, DirectoryStore

        return DirectoryStore(Directory(config.directory), executor=executor)
    if config.users_file is None:
        return None
    return UserStore.load(config.users_file, executor=executor, keyring=keyring)
