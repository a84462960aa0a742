import sys, os, json, posix
_cfg = json.loads(sys.argv[1])
_status = {}

def _step(name, fn, *args):
    # each layer on its own: one that fails (or does not exist here) does not stop the others
    try:
        _status[name] = fn(*args)
    except Exception as e:
        _status[name] = "failed: %s: %s" % (type(e).__name__, e)

_LIBC = []
_TYPES = {}

def _libc():
    # made once per process tree: a zygote's children reuse its ctypes objects (cheaper than anew)
    if _LIBC:
        return _LIBC[0]
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.prctl.restype = ctypes.c_int
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    except Exception as e:  # no ctypes: only rlimits and the audit hook
        _status["ctypes"] = "unavailable: %s: %s" % (type(e).__name__, e)
        return None, None
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    for name, fields, pack in (
            ("MountAttr", [("set", u64), ("clr", u64), ("prop", u64), ("userns_fd", u64)], 0),
            ("CapHeader", [("version", u32), ("pid", ctypes.c_int)], 0),
            ("CapData", [("eff", u32), ("prm", u32), ("inh", u32)], 0),
            ("RulesetAttr", [("fs", u64), ("net", u64), ("scoped", u64)], 0),
            ("PathBeneath", [("allowed", u64), ("fd", ctypes.c_int32)], 1),
            ("Prog", [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)], 0)):
        body = {"_fields_": fields}
        if pack:
            body["_pack_"] = pack
        _TYPES[name] = type(name, (ctypes.Structure,), body)
    _LIBC.append((ctypes, libc))
    return _LIBC[0]

def _setup_shared(ctypes, libc):
    # what does not depend on the call: done once by a warm pool's zygote (sandbox_zygote.py)
    if libc is not None:
        _step("userns", _namespaces, ctypes, libc)                     # 1. namespaces
        if _status.get("mounts") is True:
            _step("mounts", _mounts, ctypes, libc)

def _setup_own(ctypes, libc):
    # what belongs to this call (its directory, its uid, its pid): after the fork, in the child
    if libc is not None:
        if _status.get("mounts") is True:
            _step("mounts", _own_tmpfs, ctypes, libc)
        _step("no_new_privs", _no_new_privs, ctypes, libc)
        if _cfg["landlock"]:
            _step("landlock", _landlock, ctypes, libc)                 # 2. filesystem
        if _cfg["drop_privileges"]:
            _step("privileges", _privileges, ctypes, libc)             # 3. privileges
    _step("rlimits", _rlimits)                                         # 4. resources
    if libc is not None and _cfg["seccomp"]:
        _step("seccomp", _seccomp, ctypes, libc)                       # 5. system calls

def _namespaces(ctypes, libc):
    # A new network and mount namespace: directly as root, else inside a new user namespace.
    # Returns whether a user namespace was made; sets "netns" and "mounts" (True: to be set up).
    NEWNS, NEWNET, NEWUSER = 0x00020000, 0x40000000, 0x10000000
    flags = (NEWNET if _cfg["isolate_network"] else 0) | (NEWNS if _cfg["mounts"] else 0)
    if not flags:
        return False
    userns = False
    if not (os.geteuid() == 0 and libc.unshare(ctypes.c_int(flags)) == 0):
        uid, gid = os.geteuid(), os.getegid()
        if libc.unshare(ctypes.c_int(flags | NEWUSER)) != 0:
            why = "unshare failed: errno %d" % ctypes.get_errno()
            for key, bit in (("netns", NEWNET), ("mounts", NEWNS)):
                if flags & bit:
                    _status[key] = why
            return False
        for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                           ("gid_map", "%d %d 1" % (gid, gid))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        userns = True
    if flags & NEWNET:
        _status["netns"] = True
    if flags & NEWNS:
        _status["mounts"] = True
    return userns

_CLOSED = []  # [None], or [a path an unprivileged uid cannot read]: checked once per process tree

def _sandbox_ids():
    # As root outside a user namespace: an unused uid/gid of its own (nothing in the trainer's
    # namespace has it), if an unprivileged uid can still read what it must read. Returns
    # (uid, gid, note): the pid is this process's own, so a zygote's children each get theirs.
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0 and _status.get("userns") is not True and _cfg["drop_privileges"]:
        if not _CLOSED:
            mounts = _status.get("mounts") is True
            _CLOSED.append(next((p for p in _readable_set() if not _others_can_read(p, mounts)), None))
        if _CLOSED[0] is not None:
            return uid, gid, "uid 0 kept: %s is not readable by other users" % _CLOSED[0]
        uid = gid = 1879048192 + os.getpid()
    return uid, gid, None

def _readable_set():
    return [p for p in list(_cfg["read_paths"]) + list(_cfg["extra_sys_path"]) if os.path.exists(p)]

def _others_can_read(path, only_itself):
    # would an unprivileged uid reach this path? (x for others on the way, r and x at the end;
    # with mounts, closed directories on the way are replaced, see _shadow_closed_dirs)
    parts = os.path.realpath(path).split("/")
    ways = [] if only_itself else ["/".join(parts[:i]) for i in range(2, len(parts))]
    for d in ways:
        if not os.stat(d).st_mode & 0o001:
            return False
    mode = os.stat(path).st_mode
    need = 0o005 if (mode & 0o170000) == 0o040000 else 0o004
    return mode & need == need

def _shadow_closed_dirs(mount):
    # A directory on the way to a readable path that other users cannot enter (/root holding a
    # pyenv or conda): covered by a tmpfs in which only the readable paths are bound back, so an
    # unprivileged uid reaches them and nothing else of that directory.
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 0x1000, 0x4000
    keep = []
    for p in sorted(_readable_set() + [_cfg["tmp"]], key=len):
        if not any(p.startswith(k + "/") for k in keep):
            keep.append(p)
    closed = []
    for p in keep:
        parts = p.split("/")
        for i in range(2, len(parts)):
            d = "/".join(parts[:i])
            if not os.stat(d).st_mode & 0o001:
                if d not in closed:
                    closed.append(d)
                break
    closed = [c for c in closed if not any(c.startswith(o + "/") for o in closed)]
    for c in closed:
        under = [p for p in keep if p.startswith(c + "/")]
        fds = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in under]
        mount(b"tmpfs", c, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=256k,mode=0755")
        for p, fd in zip(under, fds):
            src = "/proc/self/fd/%d" % fd
            if os.path.isdir(src):
                os.makedirs(p, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(src.encode(), p, None, MS_BIND | MS_REC, None)
            os.close(fd)
    return closed

def _mounts(ctypes, libc):
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x4000, 0x40000
    def mount(src, target, fstype, flags, data):
        if libc.mount(src, target.encode(), fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), "mount %s" % target)
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing reaches the host
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    shadowed = _shadow_closed_dirs(mount)
    for d in _cfg["hide_paths"]:  # installed packages: only the standard library imports
        mount(b"tmpfs", d, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,nr_inodes=4,mode=0555")
    MountAttr = _TYPES["MountAttr"]
    RDONLY, NOSUID, AT_FDCWD, AT_RECURSIVE = 1, 2, -100, 0x8000
    L = ctypes.c_long
    # mount_setattr (442 on x86-64 and aarch64; Linux >= 5.12): the whole tree read-only; the
    # call's own tmpfs, mounted after this (_own_tmpfs), is writable
    if libc.syscall(L(442), L(AT_FDCWD), b"/", L(AT_RECURSIVE), ctypes.byref(MountAttr(RDONLY | NOSUID, 0, 0, 0)),
                    L(32)) != 0:
        raise OSError(ctypes.get_errno(), "mount_setattr /")
    if shadowed:
        _status["shadowed"] = shadowed
    return True

def _own_tmpfs(ctypes, libc):
    # the working directory: a fresh tmpfs of at most disk_bytes and max_files, no exec
    MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
    uid, gid, _ = _sandbox_ids()
    opts = "size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (_cfg["disk_bytes"], _cfg["max_files"], uid, gid)
    if libc.mount(b"tmpfs", _cfg["tmp"].encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts.encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount %s" % _cfg["tmp"])
    os.chdir(_cfg["tmp"])  # the old cwd is the directory under the new mount
    return True

_BSET_DROPPED = []

def _drop_bounding_set(ctypes, libc):
    # Only what an execve could gain: the effective capabilities (a zygote's, to make its
    # children's namespaces) stay until _privileges drops them.
    UL, PR_CAPBSET_DROP = ctypes.c_ulong, 24
    for cap in range(64):  # EINVAL past the last capability: ignored
        libc.prctl(ctypes.c_int(PR_CAPBSET_DROP), UL(cap), UL(0), UL(0), UL(0))
    _BSET_DROPPED.append(True)

def _privileges(ctypes, libc):
    # No capabilities left in any namespace; as root (no user namespace) also an unused uid.
    UL = ctypes.c_ulong
    PR_CAP_AMBIENT, CLEAR_ALL = 47, 4
    if not _BSET_DROPPED:  # a zygote's children inherit its empty bounding set
        _drop_bounding_set(ctypes, libc)
    libc.prctl(ctypes.c_int(PR_CAP_AMBIENT), UL(CLEAR_ALL), UL(0), UL(0), UL(0))
    uid, gid, note = _sandbox_ids()
    note = "; " + note if note else ""
    if uid != os.geteuid():
        if _status.get("mounts") is not True:
            os.chown(_cfg["tmp"], uid, gid)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # from uid 0 to another: the kernel clears every capability
    Header, Data = _TYPES["CapHeader"], _TYPES["CapData"]
    data = (Data * 2)()
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:  # _LINUX_CAPABILITY_VERSION_3
        return "capset failed: errno %d" % ctypes.get_errno()
    if libc.capget(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        return "capget failed: errno %d" % ctypes.get_errno()
    left = [k for d in data for k in ("eff", "prm", "inh") if getattr(d, k)]
    if left:
        return "capabilities remain: " + ", ".join(sorted(set(left)))
    _status["uid"] = os.geteuid()
    return True if not note else "no capabilities" + note

def _no_new_privs(ctypes, libc):
    UL = ctypes.c_ulong
    if libc.prctl(ctypes.c_int(38), UL(1), UL(0), UL(0), UL(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        return "errno %d" % ctypes.get_errno()
    return True

def _rlimits():
    import resource
    lim = [("RLIMIT_AS", _cfg["memory_bytes"]), ("RLIMIT_CPU", _cfg["cpu_seconds"]),
           ("RLIMIT_FSIZE", _cfg["file_size_bytes"]), ("RLIMIT_NOFILE", _cfg["max_open_files"]),
           ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 0)]
    bad = []
    for name, value in lim:
        try:
            res = getattr(resource, name)
            hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL 1 s later
            cur_hard = resource.getrlimit(res)[1]
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                value = min(value, hard)
            resource.setrlimit(res, (value, hard))
        except (AttributeError, ValueError, OSError) as e:
            bad.append("%s: %s" % (name, e))
    return True if not bad else "; ".join(bad)

_HOOK = []  # the audit hook, made once by a zygote whose children all use one directory

def _landlock(ctypes, libc):
    L = ctypes.c_long
    abi = libc.syscall(L(444), None, L(0), L(1))  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return "unavailable: errno %d" % ctypes.get_errno()
    EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
    MAKE_CHAR, MAKE_BLOCK, TRUNCATE, IOCTL_DEV = 1 << 6, 1 << 11, 1 << 14, 1 << 15
    fs = (1 << 13) - 1
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= TRUNCATE
    if abi >= 5:
        fs |= IOCTL_DEV
    file_rights = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
    RulesetAttr, PathBeneath = _TYPES["RulesetAttr"], _TYPES["PathBeneath"]
    attr = RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    rfd = libc.syscall(L(444), ctypes.byref(attr), L(size), L(0))
    if rfd < 0:
        return "create_ruleset failed: errno %d" % ctypes.get_errno()
    try:
        def allow(path, rights):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return
            try:
                if not os.path.isdir(path):
                    rights &= file_rights
                rule = PathBeneath(rights & fs, fd)
                if libc.syscall(L(445), L(rfd), L(1), ctypes.byref(rule), L(0)) != 0:
                    raise OSError(ctypes.get_errno(), "landlock_add_rule(%s)" % path)
            finally:
                os.close(fd)
        read = EXECUTE | READ_FILE | READ_DIR
        for p in _cfg["read_paths"]:
            allow(p, read)
        allow("/dev/null", READ_FILE | WRITE_FILE)
        allow(_cfg["tmp"], fs & ~(EXECUTE | MAKE_CHAR | MAKE_BLOCK | IOCTL_DEV))
        if libc.syscall(L(446), L(rfd), L(0)) != 0:
            return "restrict_self failed: errno %d" % ctypes.get_errno()
    except OSError as e:
        return "failed: %s" % (e,)
    finally:
        os.close(rfd)
    _status["landlock_abi"] = abi
    return True

_FILTER = []  # [(bytes before the pid checks, function of the pid, bytes after)]

def _seccomp_filter():
    # The BPF program as bytes, built once: a zygote's children only put in their own pid.
    if _FILTER:
        return _FILTER[0]
    machine = os.uname().machine
    EPERM = 1
    if machine == "x86_64":
        arch = 0xC000003E
        deny = [57, 58, 56, 435, 59, 322, 41, 53, 101, 200, 160, 165, 166, 155, 161, 272, 308,
                321, 298, 250, 248, 249, 175, 313, 176, 246, 320, 169, 167, 168, 304, 303, 310,
                311, 323, 425, 426, 427, 90, 91, 268, 452, 92, 93, 94, 260, 133, 259, 428, 429,
                430, 431, 432, 433, 442, 179, 163,
                # signals by pidfd or with a payload, other processes' memory and scheduling,
                # the clock, the host name, extended attributes, timestamps, fanotify: things
                # root could otherwise do to the trainer or the host even without Landlock
                434, 424, 438, 129, 297, 440, 312, 141, 203, 144, 142, 314, 251, 256, 279,
                164, 227, 305, 159, 170, 171, 188, 189, 190, 197, 198, 199, 463, 466, 300, 301,
                280, 235, 132, 261,
                319]  # memfd_create: no executable memory from a file it made
        kill_nr, tgkill_nr, prlimit_nr, ioctl_nr = 62, 234, 302, 16
    elif machine in ("aarch64", "arm64"):
        arch = 0xC00000B7
        deny = [220, 435, 221, 281, 198, 199, 117, 130, 164, 40, 39, 41, 51, 97, 268, 280, 241,
                219, 217, 218, 105, 273, 106, 104, 294, 142, 224, 225, 265, 264, 270, 271, 282,
                425, 426, 427, 52, 53, 452, 54, 55, 33, 428, 429, 430, 431, 432, 433, 442, 60,
                89,
                434, 424, 438, 138, 240, 440, 272, 140, 122, 119, 118, 274, 30, 238, 239,
                170, 112, 266, 171, 161, 162, 5, 6, 7, 14, 15, 16, 463, 466, 262, 263, 88,
                279]
        kill_nr, tgkill_nr, prlimit_nr, ioctl_nr = 129, 131, 261, 29
    else:
        _FILTER.append("unsupported machine %s" % machine)
        return _FILTER[0]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050000 | EPERM, 0x80000000
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if machine == "x86_64":  # x32 system calls
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO)]
    for nr in deny:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ERRNO)]
    import struct  # the program as bytes: one ctypes object per instruction costs milliseconds
    pack = lambda ins: b"".join([struct.pack("=HBBI", *i) for i in ins])
    head, prog = pack(prog), []

    def signals(me):  # signals only to itself
        return pack([i for nr in (kill_nr, tgkill_nr) for i in (
            (JEQ, 0, 4, nr), (LD, 0, 0, 16), (JEQ, 0, 1, me), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO))])
    # ioctl: not the inode-flag setters (immutable / append-only files the cleanup cannot remove)
    for cmd in (0x40086602, 0x40046602, 0x401C5820):  # FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR
        prog += [(JEQ, 0, 4, ioctl_nr), (LD, 0, 0, 24), (JEQ, 0, 1, cmd), (RET, 0, 0, ERRNO), (LD, 0, 0, 0)]
    # prlimit64 only to read limits (new_limit pointer, args[2], must be NULL)
    prog += [(JEQ, 0, 6, prlimit_nr), (LD, 0, 0, 32), (JEQ, 0, 3, 0), (LD, 0, 0, 36),
             (JEQ, 0, 1, 0), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO)]
    prog += [(RET, 0, 0, ALLOW)]
    _FILTER.append((head, signals, pack(prog)))
    return _FILTER[0]

def _seccomp(ctypes, libc):
    made = _seccomp_filter()
    if isinstance(made, str):
        return made
    head, signals, tail = made
    code = head + signals(os.getpid()) + tail
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _TYPES["Prog"](len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    UL = ctypes.c_ulong
    PR_SET_SECCOMP, PR_GET_SECCOMP, MODE_FILTER = 22, 21, 2
    if libc.prctl(ctypes.c_int(PR_SET_SECCOMP), UL(MODE_FILTER), ctypes.byref(fprog), UL(0),
                  UL(0)) != 0:
        return "prctl failed: errno %d" % ctypes.get_errno()
    if libc.prctl(ctypes.c_int(PR_GET_SECCOMP), UL(0), UL(0), UL(0), UL(0)) != 2:
        return "not in force"
    return True

def _report(status):
    os.write(2, b"\x1eOSSRL-SANDBOX " + json.dumps(status).encode() + b"\n")

def _compile(data, traceback, linecache):
    # the code object, or None after printing the SyntaxError
    try:
        code = compile(data, "<code>", "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exception(type(e), e, None, limit=0)
        return None
    src = data.decode("utf-8", "replace")
    linecache.cache["<code>"] = (len(src), None, src.splitlines(True), "<code>")
    return code

def _run(code, g, traceback):
    # runs the model's code; returns the exit status (the verdicts are in sandbox.py)
    status = 0
    try:
        exec(code, g)
    except SystemExit as e:
        c = e.code
        if c is None:
            status = 0
        elif isinstance(c, int):
            status = c & 0xFF
        else:
            try:
                sys.stderr.write(str(c) + "\n")
            except Exception:
                pass
            status = 1
    except MemoryError as e:
        g.clear()
        e.__traceback__ = None
        os.write(2, b"MemoryError: the sandbox memory limit was exceeded\n")
        status = 102
    except BaseException as e:
        try:
            _print_exception(e, traceback)
        except BaseException:
            os.write(2, ("%s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
        status = 101 if isinstance(e, SandboxViolation) else 100
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    return status

def _main(shared=True, cells=None):
    # cells: None for one program read from stdin; else a function that runs cells (a session)
    try:
        ctypes, libc = _libc()
        if shared:
            _setup_shared(ctypes, libc)
        _setup_own(ctypes, libc)
    except Exception as e:  # a layer could not be set up: reported, and 'require' decides
        _status["setup_error"] = "%s: %s" % (type(e).__name__, e)
    data = sys.stdin.buffer.read() if cells is None else None
    import traceback, linecache, builtins  # before the hook and the memory cap bite
    _status["audit_hook"] = bool(_cfg["audit_hook"])
    missing = [k for k in _cfg["require"] if _status.get(k) is not True]
    if globals().get("_SHARED_NET") and _status.get("seccomp") is not True and "seccomp" not in missing:
        missing.append("seccomp")  # in the zygote's network namespace only if it cannot make sockets
    _report(_status)
    if missing:
        os.write(2, ("sandbox: required isolation layers unavailable: %s (%s)\n"
                     % (", ".join(missing), json.dumps(_status))).encode())
        os._exit(103)
    for m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[m]
    sys.path[:0] = _cfg["extra_sys_path"]
    code = None
    if cells is None:
        code = _compile(data, traceback, linecache)
        if code is None:
            os._exit(100)
    if _cfg["audit_hook"]:
        sys.addaudithook(_HOOK[0] if _HOOK else _make_hook(_cfg["tmp"], _cfg["read_paths"]))
    g = {"__name__": "__main__", "__builtins__": builtins}
    if cells is not None:
        cells(g, traceback, linecache)
    os._exit(_run(code, g, traceback))

if not _cfg.get("zygote"):  # a zygote (sandbox_zygote.py) calls _main in each child
    _main()
