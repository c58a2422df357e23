"""The `authgate` command.

User-caused problems (bad config, unknown listener, bad address) print one
clear line to stderr and exit 2; nothing a user can do prints a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from authgate import config as config_mod
from authgate.atrest.envelope import Keyring, keyring_path, unlock
from authgate.commands import apps as apps_commands
from authgate.commands import atrest as atrest_commands
from authgate.commands import control as control_commands
from authgate.commands import firewall as firewall_commands
from authgate.commands import password_policy as password_policy_commands
from authgate.commands import route as route_commands
from authgate.config import (
    BackendMode,
    ClientAddressForwarding,
    Config,
    ConfigError,
    Listener,
    TLSMode,
)
from authgate.credentials.base import CredentialStore
from authgate.credentials.schemes import SchemeError
from authgate.credentials.store import StoreError, UserStore, generate_secrets
from authgate.errors import UserError
from authgate.offers import ListenerOffer, listener_offer, load_store
from authgate.password_policy import PasswordPolicy, format_violations
from authgate.password_policy import check as check_password
from authgate.policy import Decision, Protocol, Security
from authgate.routing import RoutingError
from authgate.sasl import MECHANISMS

EXIT_USAGE = 2


# ------------------------------------------------------------------ check


def _describe_decision(label: str, decision: Decision, protocol: Protocol | None = None) -> str:
    offered = ", ".join(decision.offered) or "nothing"
    login = "allowed" if decision.cleartext_login else "refused"
    if protocol is Protocol.LDAP:
        login += " (LDAP simple bind)"
    extra = "; must STARTTLS before authenticating" if decision.tls_required else ""
    if protocol is Protocol.MANAGESIEVE:
        # RFC 5804 has no login command besides AUTHENTICATE.
        return f"    {label:<24} offers {offered}{extra}"
    return f"    {label:<24} offers {offered}; cleartext login {login}{extra}"


def _check_listener(offer: ListenerOffer, hostname: str, out: TextIO) -> None:
    listener = offer.listener
    policy = listener.policy
    backend = listener.backend
    print(
        f"listener {listener.name}: {listener.protocol.value} on {listener.listen_text} "
        f"(tls {listener.tls.value}) -> backend {backend.address} "
        f"({backend.mode.value}, tls {backend.tls.value})",
        file=out,
    )
    exempt = ", ".join(str(n) for n in policy.exempt.networks) or "none"
    print(f"  security {policy.security.value}; exempt networks: {exempt}", file=out)
    print(f"  configured mechanisms: {', '.join(policy.mechanisms)}", file=out)
    relay = backend.mode is BackendMode.RELAY
    if "DIGEST-MD5" in policy.mechanisms and not relay:
        names = ", ".join((hostname, *listener.hostnames))
        print(
            f"  DIGEST-MD5 digest-uri may name: {names}, or the address a client connects to",
            file=out,
        )
    if "NTLM" in policy.mechanisms and not relay:
        if policy.allow_ntlm_legacy:
            accepted = "NTLMv2, NTLMv1 and NTLM2 session responses (allow_ntlm_legacy); never LM"
        else:
            accepted = "NTLMv2 only (allow_ntlm_legacy off: NTLMv1 clients are refused)"
        print(f"  NTLM accepts: {accepted}", file=out)
    for name, users in offer.store.dropped.items():
        reason = offer.store.reasons.get(name, "the store cannot verify it")
        who = f" (users: {', '.join(users)})" if users else ""
        print(f"  dropped {name}: {reason}{who}", file=out)
    # A non-exempt client in each TLS state, then an exempt one.
    outsider = _outsider_address(listener)
    states = [("inside TLS", True)]
    if listener.tls is not TLSMode.IMPLICIT:
        states.insert(0, ("without TLS", False))
    for label, tls in states:
        decision = offer.decide(outsider, tls=tls)
        print(_describe_decision(label + ":", decision, listener.protocol), file=out)
    if policy.exempt and listener.tls is not TLSMode.IMPLICIT:
        sample = policy.exempt.networks[0].network_address
        decision = offer.decide(sample, tls=False)
        print(_describe_decision("exempt, without TLS:", decision, listener.protocol), file=out)
    if listener.tls is TLSMode.NONE and policy.security is Security.REQUIRE_ENCRYPTED:
        print(
            "  warning: require-encrypted on a listener without TLS: only exempt clients can "
            "authenticate",
            file=out,
        )
    if policy.allow_ntlm_legacy:
        _warn_ntlm_legacy(offer, outsider, out)
    forwarding = _address_forwarding_warning(listener)
    if forwarding:
        print(f"  warning: {forwarding}", file=out)
    proxy_account = _nntp_proxy_account_note(listener)
    if proxy_account:
        print(f"  note: {proxy_account}", file=out)


def _nntp_proxy_account_note(listener: Listener) -> str | None:
    """NNTP terminate mode toward a backend that offers AUTHINFO USER (INN)
    logs in as the master user itself: AUTHINFO USER has no authzid."""
    backend = listener.backend
    if listener.protocol is not Protocol.NNTP or backend.mode is not BackendMode.TERMINATE:
        return None
    if not any(MECHANISMS[m].cleartext for m in backend.mechanisms if m in MECHANISMS):
        return None
    return (
        f"toward a backend that offers AUTHINFO USER (INN), authgate logs in as the one "
        f"account {backend.master_user!r} (AUTHINFO USER names no second identity): the "
        "backend sees every reader as it"
    )


def _warn_ntlm_legacy(
    offer: ListenerOffer, outsider: ipaddress.IPv4Address | ipaddress.IPv6Address, out: TextIO
) -> None:
    listener = offer.listener
    if listener.backend.mode is BackendMode.RELAY:
        print(
            "  warning: allow_ntlm_legacy has no effect in relay mode: the backend verifies NTLM",
            file=out,
        )
        return
    if "NTLM" not in listener.policy.mechanisms:
        print("  warning: allow_ntlm_legacy has no effect: NTLM is not enabled", file=out)
        return
    cleartext = listener.tls is not TLSMode.IMPLICIT and "NTLM" in (
        offer.decide(outsider, tls=False).offered
    )
    where = (
        " This listener accepts NTLM without TLS: anyone on the path can capture one."
        if cleartext
        else ""
    )
    print(
        "  warning: allow_ntlm_legacy is on: NTLMv1 and NTLM2 session responses are DES-based,"
        " and one captured exchange gives the user's NT hash (enough to log in as them) to an"
        f" offline key search.{where} Turn it on only for clients that send nothing better.",
        file=out,
    )


def _address_forwarding_warning(listener: Listener) -> str | None:
    """An SMTP backend that is not told the client's address sees every
    client as authgate: for a Postfix whose mynetworks holds authgate's
    address (127.0.0.1 by default), mail passed through is trusted mail."""
    backend = listener.backend
    if listener.protocol is not Protocol.SMTP:
        return None
    if backend.client_address is not ClientAddressForwarding.NONE:
        return None
    if listener.submission and backend.mode is BackendMode.TERMINATE and not backend.master_user:
        return None  # XCLIENT LOGIN= carries ADDR= too
    fix = (
        'set client_address = "xclient" (Postfix smtpd_authorized_xclient_hosts) or '
        '"proxy-v2" (Postfix smtpd_upstream_proxy_protocol)'
    )
    if not listener.submission:
        return (
            'mail passed through to the backend does not carry the client\'s address '
            '(client_address = "none"): the backend sees every client as authgate\'s own '
            "address, and a Postfix whose mynetworks holds it (127.0.0.1 by default) relays "
            f"for anyone on the Internet; {fix}"
        )
    return (
        'the backend is not told the client\'s address (client_address = "none"): its logs, '
        f"limits and access rules see authgate's address for every client; {fix}"
    )


def _outsider_address(listener: Listener) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address that is in no exempt network, to show the strict case."""
    for candidate in ("198.51.100.7", "2001:db8::7", "203.0.113.9"):
        address = ipaddress.ip_address(candidate)
        if address not in listener.policy.exempt:
            return address
    return ipaddress.ip_address("192.0.2.1")


def cmd_check(args: argparse.Namespace) -> int:
    from authgate.firewall import warnings

    config = _load_config(args.config)
    store = _load_store(config, _keyring(args, config))
    print(f"{config.path}: OK, {len(config.listeners)} listener(s)")
    if config.tls.cert is not None and config.tls.key is not None:
        from authgate.proxy.tls import TLSConfigError, server_context

        try:
            server_context(config.tls.cert, config.tls.key)
        except TLSConfigError as exc:
            # A warning, not an error: certificates are often installed
            # after the config is written (`authgate certs` makes dev ones).
            print(f"warning: {exc}; `authgate run` will refuse to start")
    if store is not None:
        print(f"users: {config.users_file} ({len(store)} user(s))")
    table = _wrap(lambda: route_commands.load_table(config))
    _wrap(lambda: route_commands.check_user_entries(config, store))
    for listener in config.listeners:
        _check_listener(
            listener_offer(listener, store, config.hostname, oauth=config.oauth is not None),
            config.hostname,
            sys.stdout,
        )
        for line in route_commands.routing_summary(config, listener, table):
            print(line)
    for warning in warnings(config, store):
        print(f"warning: {warning}")
    for loop in config_mod.loops(config):
        print(f"warning: {loop}; `authgate run` refuses such connections")
    return 0


# -------------------------------------------------------------- negotiate


def cmd_negotiate(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    listener = _find_listener(config, args.listener)
    try:
        client = ipaddress.ip_address(args.client_ip)
    except ValueError:
        raise UserError(f"--client-ip: {args.client_ip!r} is not an IP address") from None
    store = _load_store(config, _keyring(args, config))
    offer = listener_offer(listener, store, config.hostname, oauth=config.oauth is not None)
    decision = offer.decide(client, tls=args.tls)
    table = _wrap(lambda: route_commands.load_table(config))
    try:
        route = route_commands.explain_route(config, listener, store, table, args.user)
        backend: dict[str, Any] = route_commands.route_json(route)
    except RoutingError as exc:
        backend = {"error": str(exc)}
    client_mechs = (
        [m.strip().upper() for m in args.client_mechs.split(",") if m.strip()]
        if (args.client_mechs)
        else []
    )
    chosen = decision.choose(client_mechs) if client_mechs else None
    result: dict[str, Any] = {
        "listener": listener.name,
        "protocol": listener.protocol.value,
        "client_ip": str(client),
        "tls": args.tls,
        "exempt": decision.exempt,
        "security": decision.effective.value,
        "offered": list(decision.offered),
        "cleartext_login": decision.cleartext_login,
        "tls_required": decision.tls_required,
        "session_tls_required": decision.session_tls_required,
        "chosen": chosen,
        # Would an NTLMv1 / NTLM2 session response be accepted from this
        # client? null in relay mode: the backend verifies NTLM there.
        "ntlm_legacy": None
        if listener.backend.mode is BackendMode.RELAY
        else "NTLM" in decision.offered and listener.policy.allow_ntlm_legacy,
        "withheld": {
            name: offer.explain(reason, name) for name, reason in decision.withheld.items()
        },
        # Where the session would go (for --user, else the listener's default).
        "backend": backend,
    }
    if listener.protocol is Protocol.LDAP:
        # What the LDAP relay answers a simple bind (the policy's cleartext
        # rule, in the resultCode the client sees).
        from authgate.protocols.ldap import simple_bind_refusal

        refused = simple_bind_refusal(decision)
        result["ldap_simple_bind"] = (
            "relayed to the directory"
            if refused is None
            else f"refused with {refused[0].rfc_name} ({int(refused[0])})"
        )
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"listener {listener.name} ({listener.protocol.value}), client {client}, "
        f"{'inside TLS' if args.tls else 'without TLS'}"
        f"{', exempt' if decision.exempt else ''}: policy {decision.effective.value}"
    )
    print(f"  offered: {', '.join(decision.offered) or 'nothing'}")
    print(f"  cleartext login: {'allowed' if decision.cleartext_login else 'refused'}")
    if listener.protocol is Protocol.LDAP:
        print(f"  simple bind with a password: {result['ldap_simple_bind']}")
    if result["ntlm_legacy"] is not None and "NTLM" in decision.offered:
        legacy = "accepted" if result["ntlm_legacy"] else "refused (allow_ntlm_legacy off)"
        print(f"  NTLMv1 / NTLM2 session responses: {legacy}")
    if decision.tls_required:
        print("  nothing may authenticate until TLS is started")
    for name, reason in decision.withheld.items():
        print(f"  not offered {name}: {offer.explain(reason, name)}")
    if client_mechs:
        print(f"  chosen: {chosen or 'none in common'}")
    if "error" in backend:
        print(f"  backend: none ({backend['error']})")
    else:
        print(f"  backend: {backend['name']} at {backend['address']} ({backend['why']})")
    return 0


# ----------------------------------------------------------------- passwd


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise UserError("no terminal to ask for the password: use --password-stdin")
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise UserError("the passwords do not match")
    if not password:
        raise UserError("the password is empty")
    return password


def _open_users(
    args: argparse.Namespace,
) -> tuple[UserStore, Path, str | None, PasswordPolicy]:
    """The users file of --users or of -c's config, loaded (unlocked when it
    is encrypted at rest; an empty store when it does not exist yet), with
    the config's hostname and password policy."""
    users_file: Path | None = args.users
    realm: str | None = None
    policy = PasswordPolicy()
    keyring = None
    if users_file is None:
        if args.config is None:
            raise UserError("give -c CONFIG or --users FILE")
        config = _load_config(args.config)
        if config.users_file is None:
            raise UserError(f"{config.path}: no [users] file is configured")
        users_file = config.users_file
        realm = config.hostname
        policy = config.password_policy
        keyring = _keyring(args, config)
    existing = users_file
    store = (
        _wrap(lambda: UserStore.load(existing, keyring=keyring))
        if existing.exists()
        else UserStore()
    )
    return store, existing, realm, policy


def _open_users_file(args: argparse.Namespace) -> tuple[UserStore, Path]:
    store, users_file, _realm, _policy = _open_users(args)
    return store, users_file


def _users_file_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="config whose [users] file to change")
    parser.add_argument("--users", type=Path, help="the users file (instead of -c)")
    _password_file_option(parser)


def cmd_passwd(args: argparse.Namespace) -> int:
    store, existing, config_realm, policy = _open_users(args)
    users_file = existing
    if args.app is not None:
        return apps_commands.create_app_password(
            store, users_file, args.user, args.app, args.protocols
        )
    if args.protocols is not None:
        raise UserError("--protocols limits an app password: give --app LABEL too")
    realm = args.realm or config_realm or store.realm or "localhost"
    password = _read_password(args)
    user = store.user(args.user)
    problems = check_password(policy, password, args.user, user.full_name if user else None)
    if problems:
        raise UserError(format_violations(problems))
    secrets = generate_secrets(args.user, password, realm)
    today = datetime.date.today()
    _wrap(lambda: store.set_user_secrets(args.user, secrets, realm=realm, password_changed=today))
    _wrap(lambda: store.save(existing))
    print(f"{users_file}: password set for {args.user} ({len(secrets)} stored forms)")
    return 0


# ------------------------------------------------------------- run, demo


def cmd_run(args: argparse.Namespace) -> int:
    from authgate.proxy.tls import TLSConfigError
    from authgate.runner import run, setup_logging, verification_pool

    config = _load_config(args.config)
    keyring = _keyring(args, config)
    store: CredentialStore | None = _wrap(lambda: load_store(config, verification_pool(), keyring))
    setup_logging(config.log_level.number, config.log_format)
    try:
        return run(config, store, keyring)
    except TLSConfigError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # e.g. address already in use
        raise UserError(f"cannot listen: {exc.strerror or exc}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from authgate import demo
    from authgate.runner import setup_logging

    setup_logging()
    try:
        demo.main(args.certs)
    except OSError as exc:
        raise UserError(
            f"cannot start the demo: {exc.strerror or exc} (is another demo running?)"
        ) from None
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from authgate.certs import ensure_dev_certificates

    ca = ensure_dev_certificates(args.dir, force=args.force)
    print(f"{args.dir}: server.pem, server.key (localhost, 127.0.0.1, ::1); trust {ca}")
    return 0


# ------------------------------------------------------------------ shared


def _wrap(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except (ConfigError, StoreError, SchemeError) as exc:
        raise UserError(str(exc)) from None


def _load_config(path: Path) -> Config:
    result: Config = _wrap(lambda: config_mod.load(path))
    return result


def _load_store(config: Config, keyring: Keyring | None) -> CredentialStore | None:
    result: CredentialStore | None = _wrap(lambda: load_store(config, keyring=keyring))
    return result


def _keyring(args: argparse.Namespace, config: Config) -> Keyring | None:
    """Unlock the files encrypted at rest, when the config's folder has a
    keyring: the admin password from --password-file, $AUTHGATE_PASSWORD or
    a prompt."""
    if not keyring_path(config.path.parent).exists():
        return None
    password = atrest_commands.read_password(getattr(args, "password_file", None))
    return unlock(config.path.parent, password)


def _password_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-file",
        type=Path,
        help="admin password for files encrypted at rest (else $AUTHGATE_PASSWORD or a prompt)",
    )


def _find_listener(config: Config, name: str) -> Listener:
    result: Listener = _wrap(lambda: config.listener(name))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authgate",
        description="Authentication gateway for SMTP, IMAP and POP3.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the proxy in the foreground (logs to stderr)")
    p.add_argument("-c", "--config", type=Path, required=True)
    _password_file_option(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the demo: the proxy in front of embedded backends")
    p.add_argument("--certs", type=Path, default=Path("certs"), help="dev certificate folder")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("certs", help="make a development CA and server certificate")
    p.add_argument("--dir", type=Path, default=Path("certs"))
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("check", help="validate a config and show each listener's effective policy")
    p.add_argument("-c", "--config", type=Path, required=True)
    _password_file_option(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("negotiate", help="show what a client would be offered on a listener")
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--listener", required=True, help="listener name")
    p.add_argument("--client-ip", required=True, help="the client's address")
    p.add_argument("--tls", action="store_true", help="the connection is inside TLS")
    p.add_argument("--client-mechs", default="", help="mechanisms the client supports, A,B,...")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--user", help="the user logging in: shows the backend they would go to")
    _password_file_option(p)
    p.set_defaults(func=cmd_negotiate)

    p = sub.add_parser("passwd", help="set a user's password, or create an app password")
    p.add_argument("user")
    p.add_argument("--realm", help="DIGEST-MD5 realm (default: the config's hostname)")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    p.add_argument(
        "--app", metavar="LABEL", help="generate an app password labelled LABEL (shown once)"
    )
    p.add_argument(
        "--protocols",
        metavar="P,P",
        help="limit the app password to these protocols (imap,pop3,smtp,nntp,managesieve)",
    )
    _users_file_options(p)
    p.set_defaults(func=cmd_passwd)
    apps_commands.add_commands(sub, _open_users_file, _users_file_options)
    atrest_commands.add_commands(sub)
    firewall_commands.add_commands(sub)
    control_commands.add_commands(sub)
    route_commands.add_commands(sub)
    password_policy_commands.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except UserError as exc:
        print(f"authgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `authgate check ... | head`: the reader left; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
