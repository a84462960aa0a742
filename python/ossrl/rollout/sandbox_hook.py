# The sandbox's audit hook (layer 6), read as text and run in front of sandbox_bootstrap.py
# inside the sandboxed interpreter. It gives clear messages; it is no security boundary.
import os, posix, sys

class SandboxViolation(PermissionError):
    pass

def _make_hook(tmp, read_dirs, violation=SandboxViolation):
    import pathlib
    deny_prefix = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                   "os.forkpty", "subprocess.", "_posixsubprocess.", "pty.", "socket.",
                   "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill",
                   "resource.setrlimit", "resource.prlimit", "gc.get_referrers",
                   "gc.get_referents", "gc.get_objects", "os.chmod", "os.chown",
                   "os.lchown", "os.chflags", "os.lchflags", "os.mknod", "os.setxattr",
                   "os.removexattr", "sys.remote_exec")
    deny_import = ("ctypes", "_ctypes", "_posixsubprocess")
    # event: (path argument positions, dir_fd positions, "r" or "w")
    path_events = {
        "os.listdir": ((0,), (), "r"), "os.scandir": ((0,), (), "r"),
        "os.listxattr": ((0,), (), "r"), "os.getxattr": ((0,), (), "r"),
        "os.mkdir": ((0,), (2,), "w"), "os.remove": ((0,), (1,), "w"),
        "os.rmdir": ((0,), (1,), "w"), "os.rename": ((0, 1), (2, 3), "w"),
        "os.link": ((0, 1), (2, 3), "w"), "os.symlink": ((1,), (2,), "w"),
        "os.truncate": ((0,), (), "w"), "os.utime": ((0,), (3,), "w"),
        "os.mkfifo": ((0,), (2,), "w"),
    }
    path_types = (pathlib.PosixPath, pathlib.PurePosixPath)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    dir_flags = os.O_DIRECTORY | getattr(os, "O_PATH", 0)

    def resolve(p, _lstat=posix.lstat, _readlink=posix.readlink, _getcwd=posix.getcwd,
                _OSError=OSError, _list=list, _reversed=reversed, _violation=violation, _len=len,
                _FileNotFoundError=FileNotFoundError, _NotADirectoryError=NotADirectoryError):
        if not p.startswith("/"):
            p = _getcwd() + "/" + p
        todo = _list(_reversed(p.split("/")))
        out = []
        links = 0
        while todo:
            c = todo.pop()
            if c == "" or c == ".":
                continue
            if c == "..":
                if out:
                    out.pop()
                continue
            cand = "/" + "/".join(out + [c])
            if _len(cand) >= 4096:  # the kernel would resolve it relative to the cwd: refuse
                raise _violation("sandbox: path too long to check")
            try:
                st = _lstat(cand)
            except (_FileNotFoundError, _NotADirectoryError):
                out.append(c)
                continue
            except _OSError as e:  # fail closed: a path it cannot check is not allowed
                raise _violation("sandbox: cannot check the path: %s" % (e.strerror,))
            if (st.st_mode & 0o170000) == 0o120000:
                links += 1
                if links > 40:
                    raise _violation("sandbox: too many symbolic links")
                target = _readlink(cand)
                if target.startswith("/"):
                    out = []
                todo.extend(_reversed(target.split("/")))
            else:
                out.append(c)
        return "/" + "/".join(out)

    def within(p, dirs):
        for d in dirs:
            if p == d or p.startswith(d + "/") or d == "/":
                return True
        return False

    def topath(p, _type=type, _str=str, _bytes=bytes, _int=int, _fspath=posix.fspath,
               _violation=violation, _path_types=path_types):
        t = _type(p)
        if t is _str:
            return p
        if t is _bytes:
            return p.decode("utf-8", "surrogateescape")
        if t in _path_types:
            return _str(_fspath(p))
        raise _violation("sandbox: unsupported path object %r" % (t,))

    def hook(event, args, _deny_prefix=deny_prefix, _deny_import=deny_import,
             _path_events=path_events, _resolve=resolve, _within=within, _topath=topath,
             _tmp=(tmp,), _read=tuple([tmp] + list(read_dirs)), _violation=violation,
             _int=int, _type=type, _len=len, _write_flags=write_flags, _dir_flags=dir_flags,
             _isdir=posix.stat, _protected=[], _none=None, _str=str):
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(path) is _int:
                return
            if mode is not _none and _type(mode) is not _str:  # no methods of the caller's objects
                raise _violation("sandbox: open() mode must be a str")
            p = _resolve(_topath(path))
            writing = (_type(flags) is _int and flags & _write_flags) or (
                mode is not _none and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if writing:
                if not _within(p, _tmp):
                    raise _violation("sandbox: writing outside the working directory is not allowed: %r" % (p,))
                return
            if not _within(p, _read):
                raise _violation("sandbox: reading files outside the working directory and the standard library is not allowed: %r" % (p,))
            if mode is _none:  # os.open: no directory fds (they would make dir_fd escapes possible)
                if _type(flags) is _int and flags & _dir_flags:
                    raise _violation("sandbox: opening directories with os.open is not allowed")
                try:
                    isdir = (_isdir(p).st_mode & 0o170000) == 0o040000
                except OSError:
                    isdir = False
                if isdir:
                    raise _violation("sandbox: opening directories with os.open is not allowed")
            return
        if event.startswith(_deny_prefix):
            raise _violation("sandbox: %s is not allowed" % event)
        if event == "import":
            name = args[0]
            if _type(name) is not _str:  # a str subclass's __eq__ would run inside the hook
                raise _violation("sandbox: module names must be str")
            for d in _deny_import:
                if name == d or name.startswith(d + "."):
                    raise _violation("sandbox: importing %s is not allowed" % name)
            return
        spec = _path_events.get(event)
        if spec is not _none:
            paths, dirfds, kind = spec
            for i in dirfds:
                if i < _len(args) and args[i] is not _none and args[i] != -1:
                    raise _violation("sandbox: dir_fd arguments are not allowed")
            for i in paths:
                if i >= _len(args):
                    continue
                a = args[i]
                if _type(a) is _int:
                    if kind == "w" and event != "os.truncate":
                        raise _violation("sandbox: %s on a file descriptor is not allowed" % event)
                    if event in ("os.listdir", "os.scandir"):
                        raise _violation("sandbox: %s on a file descriptor is not allowed" % event)
                    continue
                p = _resolve(_topath(a if a is not _none else "."))
                if not _within(p, _tmp if kind == "w" else _read):
                    raise _violation("sandbox: %s outside the working directory is not allowed: %r" % (event, p))
            return
        if event in ("object.__setattr__", "object.__delattr__"):
            obj = args[0]
            for o in _protected:
                if obj is o:
                    raise _violation("sandbox: modifying the sandbox is not allowed")
            return
    hook.__defaults__[-3].extend([hook, resolve, within, topath, *path_types,
                                  pathlib.PurePath, type(pathlib.Path())])
    return hook

def _print_exception(e, traceback):
    # the model's frames only: drop the bootstrap's and the audit hook's (file "<string>")
    te = traceback.TracebackException(type(e), e, e.__traceback__)
    seen, todo = set(), [te]
    while todo:
        t = todo.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        t.stack = traceback.StackSummary.from_list([f for f in t.stack if f.filename != "<string>"])
        todo += [t.__cause__, t.__context__]
    sys.stderr.write("".join(te.format()))
