"""The CLI's sub-commands that belong to one domain module each
(`password_policy`, `firewall`, `atrest`): `authgate.cli` assembles them,
and only the CLI imports this package, so the domain modules import
neither the CLI nor `config.load`.
"""
