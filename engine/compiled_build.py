"""Builds the optional compiled build: ``python3 -m engine.compiled_build`` (``.ci/install`` runs it).

mypyc (part of mypy) translates the typed per-packet modules listed in :data:`engine.compiled.COMPILED_SOURCES`
to C and a C compiler turns them into extension modules. They land in ``build/compiled/`` (git-ignored, never
next to the sources: see :mod:`engine.compiled`) with a manifest of the source digests they were built from.
The new build is assembled beside the old one and swapped in by renames, so a running engine keeps the
files it mapped. ``--check`` only says whether the build in place is current.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from engine.compiled import (
    BUILD_DIR,
    COMPILED_SOURCES,
    MANIFEST_NAME,
    ROOT,
    check_build,
    extension_suffix,
    module_name,
    source_digest,
)

GROUP = "dnsgate_native"  # the shared library every compiled module links to: dnsgate_native__mypyc


def build(out: Path = BUILD_DIR, sources: Sequence[str] = COMPILED_SOURCES, jobs: int = 0) -> Path:
    """Compile ``sources`` (paths relative to the project root) into ``out``; returns the manifest path."""
    from mypyc.build import mypycify  # build-time only: mypy is not needed to run either build
    from setuptools import Distribution

    digests = {source: source_digest(ROOT / source) for source in sources}  # before compiling: what we built
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="compiled-", dir=out.parent))
    staging = work / "lib"
    cwd = os.getcwd()
    os.chdir(ROOT)  # mypyc names modules after their paths relative to the working directory
    try:
        extensions = mypycify(list(sources), opt_level="3", group_name=GROUP, target_dir=str(work / "c"))
        distribution = Distribution({"name": "dnsgate-compiled", "ext_modules": extensions})
        command = distribution.get_command_obj("build_ext")
        command.build_lib = str(staging)
        command.build_temp = str(work / "obj")
        command.parallel = jobs or os.cpu_count() or 1
        distribution.run_command("build_ext")
    finally:
        os.chdir(cwd)
    suffix = extension_suffix()
    modules = {}
    for source in sources:
        extension = Path(source[: -len(".py")] + suffix)
        if not (staging / extension).exists():
            raise RuntimeError(f"mypyc produced no {extension}")
        modules[module_name(source)] = {"source": source, "extension": str(extension), "sha256": digests[source]}
    (staging / MANIFEST_NAME).write_text(json.dumps({"suffix": suffix, "modules": modules}, indent=1) + "\n")
    old = work / "old"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out / MANIFEST_NAME


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m engine.compiled_build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the build in place is current")
    parser.add_argument("--out", type=Path, default=BUILD_DIR, help=f"build directory (default {BUILD_DIR})")
    parser.add_argument("--only", nargs="+", metavar="SOURCE", default=list(COMPILED_SOURCES),
                        help="compile only these of the default sources (to measure what each one gains)")
    parser.add_argument("-j", "--jobs", type=int, default=0, help="parallel C compiles (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.check:
        modules, reason = check_build(args.out)
        print(f"compiled build current: {', '.join(modules)}" if modules else reason)
        return 0 if modules else 1
    unknown = sorted(set(args.only) - set(COMPILED_SOURCES))
    if unknown:
        parser.error(f"not in engine.compiled.COMPILED_SOURCES: {', '.join(unknown)}")
    manifest = build(args.out, args.only, jobs=args.jobs)
    print(f"compiled build: {len(args.only)} modules in {manifest.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
