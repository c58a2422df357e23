"""Build authgate with its sans-IO machines compiled by mypyc (optional).

    .venv/bin/python scripts/build_mypyc.py [--out build/mypyc]
    PYTHONPATH=build/mypyc .venv/bin/authgate run -c authgate.toml

Copies `authgate/`, `tests/` and `pyproject.toml` (its [tool.mypy] settings)
to OUT, compiles the modules in MODULES there in place with mypyc (their
`.py` files stay beside the `.so` files) and leaves the repository tree
untouched. Python imports an extension module before a source file of the
same name, so OUT/authgate runs compiled; the pure-Python package stays the
default and the fallback (a Python other than the one that built the `.so`
files, 3.11, imports the `.py` files). `./dev build-fast` runs this;
`./dev test-fast` also runs the machines' tests against the result.

Needs mypy (mypyc ships with it: the test extras have it) and a C compiler
with Python's headers. About 2 minutes on 2 cores. What it bought, in
instructions per login: docs/performance.md, "mypyc".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The sans-IO machines and what they call on every login: pure code, no
# asyncio. The asyncio drivers (authgate/proxy) stay interpreted: they
# spend their time in the event loop, and Channel subclasses
# asyncio.Protocol, which a mypyc native class cannot.
MODULES = ("authgate/protocols/*.py", "authgate/sasl/*.py", "authgate/policy.py")


def copy_tree(out: Path) -> None:
    for name in ("authgate", "tests"):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(
            ROOT / name,
            target,
            ignore=shutil.ignore_patterns("__pycache__", "*.so", ".hypothesis"),
        )
    shutil.copy2(ROOT / "pyproject.toml", out / "pyproject.toml")


def compile_modules(out: Path) -> list[str]:
    from mypyc.build import mypycify
    from setuptools import Distribution

    paths = sorted(str(p.relative_to(out)) for pattern in MODULES for p in out.glob(pattern))
    os.chdir(out)  # mypyc's build/ and .mypy_cache/ go to OUT as well
    extensions = mypycify(paths, opt_level="3")
    # Distribution(), not setup(): setup() would read OUT/pyproject.toml as
    # project metadata; only its [tool.mypy] table is wanted here.
    dist = Distribution({"name": "authgate-mypyc", "ext_modules": extensions})
    build = dist.get_command_obj("build_ext")
    build.inplace = True  # type: ignore[attr-defined]
    build.parallel = os.cpu_count() or 1  # type: ignore[attr-defined]
    dist.run_command("build_ext")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/build_mypyc.py")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "mypyc")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    copy_tree(out)
    paths = compile_modules(out)
    print(f"compiled {len(paths)} modules in {out}; run with PYTHONPATH={out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
