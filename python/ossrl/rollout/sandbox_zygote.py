# A warm pool's zygote, read as text and run after sandbox_hook.py and sandbox_bootstrap.py
# (python -I -S -B -u -c) with "zygote": true in its config. It applies the layers that do not
# depend on a call (namespaces, the read-only tree, hidden packages), imports what children use,
# then forks one child per request. The child takes the request's pipes as fds 0-2 (and 3 for a
# session), closes every other descriptor, and applies the per-call layers itself (its own mount
# namespace and, where seccomp does not hold, network namespace, a fresh tmpfs, Landlock, uid,
# rlimits, seccomp) before any model code runs: it runs exactly one program, or one session's
# cells, and exits. Model code never runs in
# the zygote, so no call sees another's files, variables, environment or descriptors.
#
# Protocol on the SOCK_SEQPACKET socket _cfg["ctl_fd"], one JSON object per message:
#   trainer -> zygote  {"op": "run", "id": n, "tmp": dir, "require": [...], "session": bool} + fds
#                      {"op": "kill", "id": n}
#   zygote -> trainer  {"ready": status, "work": dir or null}, {"id": n, "pid": p}, {"id": n, "rc": exit code}
# "work": the directory every child's tmpfs is mounted on (with mounts); without, each call has its own.
# End of file on the socket (the trainer closed it or died): every child is killed, then the zygote exits.
_before = set(sys.modules)
import signal, select, socket, struct
_ZYGOTE_MODULES = set(sys.modules) - _before - {"struct"}  # struct: ctypes uses it too

_NEWNS, _NEWNET = 0x00020000, 0x40000000
_WORK = [None]  # the directory of every child, with mounts (see _workdir)

_SHARED_NET = []  # [True]: seccomp holds here, so children share the zygote's empty network namespace

def _own_namespaces(ctypes, libc):
    # A mount namespace of its own (its tmpfs is seen by nobody else) and, unless seccomp holds,
    # a new, empty network namespace; no user namespace is needed: the zygote holds the rights.
    # With seccomp no call can create a socket (socket, socketpair and io_uring are refused), so
    # a network namespace of its own would separate nothing, at ~0.7 ms of kernel time per call
    # and as much again to free it; a child whose seccomp then fails does not run (see _main).
    own_net = _status.get("netns") is True and not _SHARED_NET
    flags = (_NEWNET if own_net else 0) | (_NEWNS if _status.get("mounts") is True else 0)
    if flags and libc.unshare(ctypes.c_int(flags)) != 0:
        why = "unshare failed: errno %d" % ctypes.get_errno()
        for key, bit in (("netns", _NEWNET), ("mounts", _NEWNS)):
            if flags & bit:
                _status[key] = why  # not the zygote's namespace: no tmpfs is mounted there
    return _status.get("userns")

def _cells(g, traceback, linecache):
    # a session: cells framed as a 4-byte length then the code on fd 3, each answered there by a
    # 4-byte status once its output is flushed; the globals stay from one cell to the next
    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(3, n - len(buf))
            if not chunk:
                os._exit(0)  # the trainer ended the session
            buf += chunk
        return buf
    while True:
        data = read(struct.unpack("<I", read(4))[0])
        code = _compile(data, traceback, linecache)
        status = 100 if code is None else _run(code, g, traceback)
        os.write(3, struct.pack("<i", status))

def _child(req, fds):
    os.setsid()  # its own process group: a kill reaches whatever it could start
    for i, fd in enumerate(fds):
        os.dup2(fd, i, inheritable=False)
    os.closerange(len(fds), os.sysconf("SC_OPEN_MAX"))  # the zygote's socket, other calls' pipes
    if req["tmp"] != _WORK[0]:  # the zygote's hook knows only its own directory
        _HOOK[:] = []
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for m in _ZYGOTE_MODULES:  # what the zygote imported for itself
        sys.modules.pop(m, None)
    _cfg["tmp"], _cfg["require"] = req["tmp"], req["require"]
    os.environ["HOME"] = os.environ["TMPDIR"] = req["tmp"]
    os.chdir(req["tmp"])
    try:
        ctypes, libc = _libc()
        if libc is not None:
            _step("userns", _own_namespaces, ctypes, libc)
    except Exception as e:
        _status["setup_error"] = "%s: %s" % (type(e).__name__, e)
    _main(shared=False, cells=_cells if req.get("session") else None)

def _workdir(ctypes, libc):
    # With mounts: the zygote's own small tmpfs over its directory, holding one mount point that
    # each child covers with its own tmpfs in its own mount namespace. Nothing of it is on the
    # host (no directory to create or remove per call: removing a mount point waits for the
    # kernel to tear the last namespace down), and each child sees only its own tmpfs there.
    base = _cfg["tmp"]
    opts = b"size=64k,nr_inodes=16,mode=0711"
    if libc.mount(b"tmpfs", base.encode(), b"tmpfs", ctypes.c_ulong(2 | 4 | 8), opts) != 0:
        raise OSError(ctypes.get_errno(), "mount %s" % base)
    os.mkdir(base + "/w", 0o755)
    return base + "/w"

def _zygote():
    ctl = socket.socket(fileno=_cfg["ctl_fd"])
    ctypes, libc = _libc()
    _setup_shared(ctypes, libc)
    work = None
    if _status.get("mounts") is True:
        try:
            work = _workdir(ctypes, libc)
        except OSError as e:
            _status["mounts"] = "failed: %s" % e
    if work is not None and _cfg["audit_hook"]:  # every child's directory is this one: its hook, once
        _WORK[0] = work
        _HOOK.append(_make_hook(work, _cfg["read_paths"]))
    _sandbox_ids()  # checks once what an unprivileged uid can read
    # what every child would otherwise do alike, done once: the children inherit it
    if libc is not None and _cfg["drop_privileges"]:
        _drop_bounding_set(ctypes, libc)
    if libc is not None and _cfg["seccomp"] and _status.get("netns") is True:
        _seccomp_filter()
        try:
            pid = os.fork()  # does the filter hold on this kernel? (it cannot be undone: in a child)
        except OSError:  # then every child makes its own network namespace
            pid = -1
        if pid == 0:
            try:
                _no_new_privs(ctypes, libc)
                os._exit(0 if _seccomp(ctypes, libc) is True else 1)
            finally:
                os._exit(1)
        if pid > 0 and os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0:
            _SHARED_NET.append(True)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]  # a child sets its own limit (memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (min(_cfg["pool_memory_bytes"], hard), hard))
    if libc is not None:  # orphans of a child come back here to be reaped and killed
        libc.prctl(ctypes.c_int(36), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    ctl.send(json.dumps({"ready": _status, "work": work}).encode())
    import gc
    gc.collect()
    if libc is not None:  # the start-up's freed heap back to the system: less for each fork to copy
        libc.malloc_trim(ctypes.c_size_t(0))
    gc.freeze()  # a child's collections leave the zygote's objects alone: their pages stay shared
    children = {}  # pid -> call id
    by_id = {}
    while True:
        ready, _, _ = select.select([ctl, rfd], [], [])
        if rfd in ready:
            os.read(rfd, 4096)
            while True:  # peek at the zombie, kill its group (its pid cannot be reused yet), reap it
                try:
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    break
                if info is None or info.si_pid == 0:
                    break
                pid = info.si_pid
                if pid in children:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
                _, st = os.waitpid(pid, 0)
                cid = children.pop(pid, None)
                if cid is not None:
                    by_id.pop(cid, None)
                    ctl.send(json.dumps({"id": cid, "rc": os.waitstatus_to_exitcode(st)}).encode())
        if ctl in ready:
            msg, fds, _, _ = socket.recv_fds(ctl, 65536, 8)
            if not msg:
                for pid in children:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
                os._exit(0)
            req = json.loads(msg)
            if req["op"] == "kill":
                pid = by_id.get(req["id"])
                if pid is not None:  # not reaped yet: the pid is still this child's
                    for kill in (os.killpg, os.kill):
                        try:
                            kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                continue
            try:
                pid = os.fork()
            except OSError as e:  # out of processes or memory: this call fails, the zygote goes on
                for fd in fds:
                    os.close(fd)
                ctl.send(json.dumps({"id": req["id"], "rc": None, "error": "fork failed: %s" % e}).encode())
                continue
            if pid == 0:
                try:
                    _child(req, fds)
                except BaseException:  # a bug of the set-up: say what it was
                    traceback.print_exc()
                finally:
                    os._exit(_EXIT_SETUP_FAILED)
            for fd in fds:
                os.close(fd)
            children[pid] = req["id"]
            by_id[req["id"]] = pid
            ctl.send(json.dumps({"id": req["id"], "pid": pid}).encode())

_EXIT_SETUP_FAILED = 104
import traceback, linecache, builtins, resource, pathlib  # what every child imports: once, here
compile("", "<warm-up>", "exec")  # the first compile() of a process builds the AST types: ~2 ms
_zygote()
