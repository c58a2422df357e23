"""Scale-out: several authgate instances behind a real HAProxy, sharing Redis."""
