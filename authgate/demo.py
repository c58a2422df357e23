"""`authgate demo`: the proxy in front of embedded backends, on a fixed
loopback layout, with dev certificates and a demo user, ready for curl.

Nothing but this package is needed: the backends are the small servers in
authgate.testing, the certificates come from trustme.
"""

from __future__ import annotations

import asyncio
import shlex
import tempfile
from pathlib import Path

from authgate.runner import wait_for_stop_signal
from authgate.testing.stack import ListenerSpec, embedded_stack

DEMO_USER = "alice"
DEMO_PASSWORD = "alice-demo-pw"  # noqa: S105 - the documented demo password
EXEMPT = "127.0.0.2/32"
HOST = "127.0.0.1"

LAYOUT = (
    ListenerSpec("imap", "imap", "starttls", 10143),
    ListenerSpec("imaps", "imap", "implicit", 10993),
    ListenerSpec("pop3", "pop3", "starttls", 10110),
    ListenerSpec("pop3s", "pop3", "implicit", 10995),
    ListenerSpec("submission", "smtp", "starttls", 10587),
    ListenerSpec("smtps", "smtp", "implicit", 10465),
    ListenerSpec("sieve", "managesieve", "starttls", 14190),
)

WELCOME = b"""From: authgate demo <demo@localhost>\r
To: alice@localhost\r
Subject: Welcome to the authgate demo\r
Message-ID: <welcome@authgate.demo>\r
\r
If you can read this, you authenticated through authgate and it spliced\r
your session to the backend.\r
"""


def instructions(ca: Path) -> str:
    ca_arg = shlex.quote(str(ca))
    user = f"{DEMO_USER}:{DEMO_PASSWORD}"
    return f"""
authgate demo is running (policy require-secure-auth, exempt network {EXEMPT}).

  IMAP   {HOST}:10143 (STARTTLS)   {HOST}:10993 (implicit TLS)
  POP3   {HOST}:10110 (STLS)       {HOST}:10995 (implicit TLS)
  SMTP   {HOST}:10587 (STARTTLS)   {HOST}:10465 (implicit TLS)
  Sieve  {HOST}:14190 (STARTTLS; ManageSieve has no implicit-TLS port)

  user {DEMO_USER}, password {DEMO_PASSWORD}
  CA to trust: {ca}

Try the policy (each command says what it shows):

  # 1. cleartext PLAIN from a non-exempt address without TLS: refused (curl exits 67)
  curl -v imap://{HOST}:10143/INBOX -u {user} --login-options AUTH=PLAIN

  # 2. the same inside TLS (STARTTLS): accepted, lists INBOX
  curl --ssl-reqd --cacert {ca_arg} imap://localhost:10143/INBOX -u {user} \\
      --login-options AUTH=PLAIN

  # 3. the same from the exempt address 127.0.0.2 without TLS: accepted
  curl --interface 127.0.0.2 imap://{HOST}:10143/INBOX -u {user} --login-options AUTH=PLAIN

  # 4. a challenge-response mechanism needs no TLS: accepted, fetches the welcome message
  curl 'imap://{HOST}:10143/INBOX;UID=1' -u {user} --login-options AUTH=CRAM-MD5

  # 5. implicit TLS on POP3, then SMTP submission sending a message to yourself: accepted
  curl --cacert {ca_arg} pop3s://localhost:10995/1 -u {user}
  printf 'Subject: hi\\r\\n\\r\\nhello\\r\\n' | curl --ssl-reqd --cacert {ca_arg} \\
      smtp://localhost:10587 -u {user} --mail-from {DEMO_USER}@localhost \\
      --mail-rcpt {DEMO_USER}@localhost -T -

  # 6. ManageSieve through STARTTLS (sieve-connect): accepted, lists the scripts
  printf '%s\n' {DEMO_PASSWORD} | sieve-connect --4 -s localhost -p 14190 \
      --tlscafile {ca_arg} -u {DEMO_USER} --passwordfd 0 --list

Stop with Ctrl-C.
"""


async def run_demo(certs_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="authgate-demo-") as scratch:
        async with embedded_stack(
            Path(scratch),
            users={DEMO_USER: DEMO_PASSWORD},
            security="require-secure-auth",
            exempt=[EXEMPT],
            layout=LAYOUT,
            host=HOST,
            certs_dir=certs_dir,
            messages={DEMO_USER: [WELCOME]},
        ) as stack:
            print(instructions(stack.ca_file.resolve()), flush=True)
            await wait_for_stop_signal()


def main(certs_dir: Path) -> None:
    asyncio.run(run_demo(certs_dir))
