"""What a sandbox may read, what it must not import, and how its directory is removed."""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import sys
import threading

# Read-only locations besides the interpreter's own sys.path (the standard library).
_SYSTEM_READ_DIRS = (
    "/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib",
    "/usr/share/zoneinfo",
)
_SYSTEM_READ_FILES = ("/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def _read_paths(config) -> list[str]:
    """Read-only paths of the sandbox: the interpreter's standard library (asked from the
    interpreter itself, cached), system library directories and the configured extras."""
    py = config.interpreter()
    paths = list(_stdlib_paths(py))
    paths += [p for p in _SYSTEM_READ_DIRS + _SYSTEM_READ_FILES if os.path.exists(p)]
    for p in tuple(config.extra_read_paths) + tuple(config.extra_sys_path):
        paths.append(os.path.realpath(p))
    out: list[str] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _package_dirs(config, read_paths: list[str]) -> list[str]:
    """site-packages / dist-packages directories inside the readable set (a standard-library
    directory holds one): covered by empty mounts so that only the standard library imports.
    Directories the config names (``extra_sys_path``, ``extra_read_paths``) stay visible."""
    cands = []
    for p in read_paths:
        cands += [os.path.join(p, "site-packages"), os.path.join(p, "dist-packages")]
    for root in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"):
        cands += glob.glob(root + "/python3*/site-packages") + glob.glob(root + "/python3*/dist-packages")
    keep = [os.path.realpath(p) for p in tuple(config.extra_sys_path) + tuple(config.extra_read_paths)]
    out: list[str] = []
    for c in cands:
        if not os.path.isdir(c):
            continue
        r = os.path.realpath(c)
        if r not in out and not any(k == r or k.startswith(r + "/") for k in keep):
            out.append(r)
    return out


_STDLIB_CACHE: dict[str, tuple[str, ...]] = {}
_STDLIB_LOCK = threading.Lock()


def _stdlib_paths(python: str) -> tuple[str, ...]:
    with _STDLIB_LOCK:
        hit = _STDLIB_CACHE.get(python)
    if hit is not None:
        return hit
    import subprocess

    # exactly the sys.path the sandboxed interpreter will have (python -I -S): the standard library
    try:
        out = subprocess.run([python, "-I", "-S", "-c", "import sys, json; print(json.dumps(sys.path))"],
                             capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=True)
        cand = json.loads(out.stdout)
    except (subprocess.SubprocessError, ValueError) as e:  # OSError (not found) passes as it is
        said = getattr(e, "stderr", None) or b""
        raise OSError(f"the sandbox interpreter {python} could not report its sys.path ({e}): "
                      f"{said[-500:].decode('utf-8', 'replace').strip()}") from None
    res = []
    for p in cand:
        if p and os.path.exists(p):
            rp = os.path.realpath(p)
            if rp not in res:
                res.append(rp)
    hit = tuple(res)
    with _STDLIB_LOCK:
        _STDLIB_CACHE[python] = hit
    return hit


def _rmtree(path: str) -> None:
    """Removes a sandbox's temporary directory, following nothing the sandbox made: a path that
    failed is made writable only if it is a real directory (not a symlink) inside ``path``."""
    root = os.path.realpath(path)

    def onerror(func, p, exc_info):  # read-only directories made by the code: fix and retry
        try:
            target = p if stat.S_ISDIR(os.lstat(p).st_mode) else os.path.dirname(p)
            st = os.lstat(target)
            real = os.path.realpath(target)
            if stat.S_ISDIR(st.st_mode) and (real == root or real.startswith(root + os.sep)):
                os.chmod(target, 0o700)  # a real directory: chmod does not follow anything
                func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda func, p, exc: onerror(func, p, None))
    else:
        shutil.rmtree(path, onerror=onerror)
