"""Builds, caches, verifies and loads graphopt's C++ kernels on first use.

Hand-written around ``torch.utils.cpp_extension.load`` (never setup.py: pip's build
isolation would install an unpinned, multi-GB CUDA torch) because ``load`` alone lacks
what a shared cache needs:

* a cache key over everything that changes the binary: source bytes, flags, torch and
  Python versions, the compiler and the host CPU's flags (the build uses
  ``-march=native``, so a binary is only valid on CPUs with the same features);
* a cross-process OS lock (``fcntl.flock``) around the build: ``load``'s own ``lock`` file
  is an O_EXCL file that a killed build leaves behind, and then every later ``load`` in
  that folder waits forever (torch 2.13). Under our flock nobody else is building, so any
  such file is stale and is removed;
* the build runs in a child process, so that the library is loaded only after its
  sha256, recorded when it was built, has been checked;
* a portable fallback (``-O3`` without ``-march=native``) when the native build fails.

The cache lives in ``$GRAPHOPT_CACHE_DIR`` or ``$XDG_CACHE_HOME/graphopt`` or
``~/.cache/graphopt``, under ``ext/<key>/``, created with mode 0o700.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from graphopt.errors import BackendError

__all__ = [
    "BuildError",
    "BuildSpec",
    "build_library",
    "cache_dir",
    "default_spec",
    "extension_available",
    "load_extension",
]

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
_SOURCES = ("ops.cpp", "sparse_csr.cpp", "sparse_bsr.cpp", "sparse_sell.cpp", "sparse_sellp.cpp", "attention.cpp", "gelu.cpp")
_HEADERS = ("sparse_common.h",)
_LIB_NAME = "graphopt_cpp"
# Bumped when this file changes how a build folder is laid out.
_CACHE_FORMAT = "1"

# -ffp-contract=fast: -std=c++20 (which cpp_extension passes) turns FMA contraction off.
# -Wno-psabi: the 8-float vector type changes ABI without AVX (portable build); it never
# crosses a library boundary.
_COMMON_CFLAGS = (
    "-O3",
    "-ffp-contract=fast",
    "-fopenmp",
    "-DNDEBUG",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-Wno-psabi",
)
_NATIVE_CFLAGS = (*_COMMON_CFLAGS, "-march=native")
_LDFLAGS = ("-fopenmp",)

# cpp_extension.load is run in the child with these arguments; it builds and loads there,
# the parent only loads what it has verified.
_CHILD_SCRIPT = """
import json, sys
from torch.utils.cpp_extension import load
a = json.loads(sys.argv[1])
load(name=a["name"], sources=a["sources"], extra_cflags=a["cflags"],
     extra_ldflags=a["ldflags"], build_directory=a["dir"], is_python_module=False,
     verbose=False)
"""


class BuildError(BackendError, RuntimeError):
    """The C++ extension could not be built or verified (a ``GraphoptError``: the CLI reports it without a
    traceback; still a ``RuntimeError`` for callers that caught it as one).

    Attributes:
        final: whether retrying with the same inputs would fail the same way.
    """

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What to build: one shared library from ``sources`` (``headers`` only enter the key).

    Attributes:
        name: library name; the file is ``<name>.so``.
        sources: C++ files compiled into the library.
        headers: files included by the sources.
        cflags: compiler flags.
        ldflags: linker flags.
    """

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()
    cflags: tuple[str, ...] = _NATIVE_CFLAGS
    ldflags: tuple[str, ...] = _LDFLAGS

    def key(self) -> str:
        """Hash of every input that changes the binary (see the module docstring)."""
        h = hashlib.sha256()
        for part in (
            _CACHE_FORMAT,
            self.name,
            json.dumps([self.cflags, self.ldflags]),
            torch.__version__,
            sys.version,
            _compiler_id(),
            _cpu_flags() if "-march=native" in self.cflags else platform.machine(),
        ):
            h.update(part.encode() + b"\0")
        for path in (*self.sources, *self.headers):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()[:24]

    def portable(self) -> BuildSpec:
        """The same build without host-specific code generation."""
        return dataclasses.replace(
            self, cflags=tuple(f for f in self.cflags if f != "-march=native")
        )


def default_spec() -> BuildSpec:
    """The spec of graphopt's kernels (native code generation)."""
    return BuildSpec(
        name=_LIB_NAME,
        sources=tuple(SOURCE_DIR / s for s in _SOURCES),
        headers=tuple(SOURCE_DIR / h for h in _HEADERS),
    )


def cache_dir() -> Path:
    """Root of the extension cache (not created here)."""
    env = os.environ.get("GRAPHOPT_CACHE_DIR")
    if env:
        return Path(env) / "ext"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "graphopt" / "ext"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        t0 = time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building in %s", path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
            logger.info("waited %.1f s for the other build", time.monotonic() - t0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock, also when a process dies


def _private_dir(path: Path) -> None:
    """Creates ``path`` (mode 0o700) and refuses a folder that others could write into."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise BuildError(
            f"refusing to build or load C++ kernels in {path}: it is not owned by this user "
            f"or is writable by others; remove it or set GRAPHOPT_CACHE_DIR to a private folder"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_stale_lock(build_dir: Path) -> None:
    """Removes cpp_extension's ``lock`` file; called only while holding our flock."""
    lock = build_dir / "lock"
    if not lock.exists():
        return
    owner = build_dir / "owner"
    pid = owner.read_text().strip() if owner.exists() else "unknown"
    logger.warning(
        "removing stale build lock %s left by process %s (killed during a build?)", lock, pid
    )
    lock.unlink(missing_ok=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # cpp_extension looks for ninja on PATH; a venv's ninja is not there unless activated.
    dirs = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    env["PATH"] = os.pathsep.join([*dirs, env.get("PATH", "")])
    return env


def _compile(spec: BuildSpec, build_dir: Path) -> None:
    """Runs cpp_extension.load in a child process; raises BuildError with its output."""
    args = {
        "name": spec.name,
        "sources": [str(s) for s in spec.sources],
        "cflags": list(spec.cflags),
        "ldflags": list(spec.ldflags),
        "dir": str(build_dir),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        env=_child_env(),
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        # A compiler error is final for these inputs; a killed child (signal) may not be.
        raise BuildError(
            f"building {spec.name} in {build_dir} failed:\n{tail}", final=proc.returncode > 0
        )


def _build_one(spec: BuildSpec, root: Path) -> Path:
    key = spec.key()
    build_dir = root / key
    _private_dir(build_dir)
    lib = build_dir / f"{spec.name}.so"
    digest = build_dir / f"{spec.name}.so.sha256"
    failed = build_dir / "failed"
    with _flock(build_dir / "build.flock"):
        if lib.exists() and digest.exists():
            if _sha256(lib) == digest.read_text().strip():
                return lib
            logger.warning("%s does not match its recorded sha256; rebuilding it", lib)
            lib.unlink()
            digest.unlink()
        if failed.exists():
            raise BuildError(f"an earlier build in {build_dir} failed:\n{failed.read_text()}")
        _remove_stale_lock(build_dir)
        (build_dir / "owner").write_text(str(os.getpid()))
        logger.info(
            "building C++ kernels %s (%s) in %s; takes ~20 s, once", spec.name, key, build_dir
        )
        t0 = time.perf_counter()
        try:
            _compile(spec, build_dir)
        except BuildError as e:
            if e.final:
                failed.write_text(str(e))
            raise
        if not lib.exists():
            raise BuildError(f"the build in {build_dir} finished without producing {lib.name}")
        tmp = digest.with_suffix(".tmp")
        tmp.write_text(_sha256(lib) + "\n")
        tmp.replace(digest)
        logger.info("built %s in %.1f s", lib, time.perf_counter() - t0)
        return lib


def build_library(spec: BuildSpec | None = None, root: Path | None = None) -> Path:
    """Builds ``spec`` into the cache unless an intact build is there; does not load it.

    Tries native code generation first, then the portable flags. A failed attempt is
    remembered in its folder (``failed``), so later calls skip straight to the fallback;
    delete the folder to retry.

    Args:
        spec: what to build; graphopt's kernels by default.
        root: cache root; :func:`cache_dir` by default.

    Returns:
        Path of the verified shared library.

    Raises:
        BuildError: when no variant builds, with the compiler's output.
    """
    spec = spec or default_spec()
    root = root or cache_dir()
    _private_dir(root)
    variants = [spec] if "-march=native" not in spec.cflags else [spec, spec.portable()]
    if os.environ.get("GRAPHOPT_CPP_PORTABLE") == "1":
        variants = [spec.portable()]
    errors = []
    for variant in variants:
        try:
            return _build_one(variant, root)
        except BuildError as e:
            logger.warning("C++ build with flags %s failed; %s", " ".join(variant.cflags), e)
            errors.append(str(e))
    raise BuildError(
        "could not build graphopt's C++ kernels; needs a C++20 compiler (c++ or $CXX) and the "
        "ninja package.\n" + "\n".join(errors)
    )


_load_lock = threading.Lock()
_loaded: Path | None = None
_load_error: BuildError | None = None


def load_extension() -> None:
    """Builds (first time only) and loads the kernels into this process; idempotent.

    Raises:
        BuildError: when the kernels cannot be built or fail verification.
    """
    global _loaded
    with _load_lock:
        if _loaded is not None:
            return
        from . import ops  # noqa: F401  (the schemas must exist before the implementations)

        lib = build_library()
        root = lib.parent
        with _flock(root / "build.flock"):
            # Checked again under the lock that a rebuild takes, right before dlopen.
            if _sha256(lib) != (root / f"{lib.stem}.so.sha256").read_text().strip():
                raise BuildError(f"{lib} changed after it was verified; delete {root} and retry")
            # Global symbols: code compiled by AOTInductor calls the kernels' C entry points
            # (aoti_torch_cpu_*) by name, resolved against the libraries loaded so far.
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            torch.ops.load_library(str(lib))
        _loaded = lib
        logger.debug("loaded %s", lib)


def extension_available() -> bool:
    """Whether the kernels are loaded; builds (~20 s, once) and loads them if needed.

    Logs why not, once.
    """
    global _load_error
    if _loaded is not None:
        return True
    if _load_error is not None:
        return False
    try:
        load_extension()
    except (BuildError, OSError) as e:
        _load_error = e if isinstance(e, BuildError) else BuildError(str(e))
        logger.warning("graphopt C++ kernels unavailable: %s", e)
        return False
    return True


def _cpu_flags() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    return f"{platform.machine()} {platform.processor()}"


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx) or cxx
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        return f"{path} {out.stdout.splitlines()[0] if out.stdout else ''}"
    return path
