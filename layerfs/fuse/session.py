"""The FUSE session: read requests from `/dev/fuse`, hand them to the filesystem, write replies.

Concurrency model. One loop, on the main thread, reads every request and serves it inline while
holding the filesystem's lock: a request costs a read, a struct unpack, a handler and a write,
with no scheduler in between (that overhead, not our handlers, was most of the daemon's time with
pyfuse3 and trio). Before blocking in `poll`, the loop polls the descriptor for a few tens of
microseconds: a request that follows another (the usual case in a `find` or an untar) is then
picked up without a wake-up across CPUs, which costs more than the handler.

A handler that would block for long raises `Defer`: always for the copy-up of a big file; for a
read that misses the page cache, or an fsync, only when other requests are waiting (else waiting
inline costs less than a hand-over). The request is then served again from the start on a
worker thread, where the handler drops the lock around the slow part (`Filesystem.blocking`)
and the loop goes on meanwhile. Handlers are written
so that running them again is harmless: they defer before they change anything.

Freezing (for `commit` of a live container): requests that would change the upper dir are held,
in order, once the ones already running on workers are done, until the thaw; reads go on.

Signals arrive on the main thread and are acted on between requests: SIGTERM/SIGINT unmount and
stop, the freeze and thaw signals freeze and thaw (see `mount`).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from layerfs.fuse import protocol as P

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20
"""Largest write (and read) request: 256 pages, the kernel's limit for max_pages."""
BUFFER_SIZE = MAX_WRITE + 4096
SPIN_SECONDS = 50e-6
"""How long the loop polls for the next request before it sleeps in poll(2)."""
_SIGNAL_CHECK_EVERY = 64
"""Requests served between two looks at the signal wakeup pipe while requests keep coming."""
WORKERS = 8
"""Threads for deferred requests: big copy-ups, and disk reads and fsyncs while others wait."""

_WANTED_FLAGS = (P.ASYNC_READ | P.ATOMIC_O_TRUNC | P.BIG_WRITES | P.DONT_MASK
                 | P.DO_READDIRPLUS | P.PARALLEL_DIROPS | P.POSIX_ACL | P.MAX_PAGES
                 | P.CACHE_SYMLINKS | P.HANDLE_KILLPRIV_V2 | P.SETXATTR_EXT)

_MUTATING = frozenset({
    P.Op.SETATTR, P.Op.SYMLINK, P.Op.MKNOD, P.Op.MKDIR, P.Op.UNLINK, P.Op.RMDIR, P.Op.RENAME,
    P.Op.RENAME2, P.Op.LINK, P.Op.WRITE, P.Op.SETXATTR, P.Op.REMOVEXATTR, P.Op.CREATE,
})
_WRITE_OPEN = os.O_WRONLY | os.O_RDWR | os.O_TRUNC

Reply = bytes | Sequence[bytes | memoryview] | None
"""A handler's answer: the payload after the header, or None for requests without a reply."""


GC_YOUNGEST = 50_000
"""Allocations between collections of the youngest generation (Python's default: 700)."""


def _tune_gc() -> None:
    """Collect less often: a walk makes a node, a stat and a packed entry per name, which live
    as long as the kernel holds the inode, so the collector finds little to free and, at the
    default thresholds, took 6% of the daemon's time in a cold walk. Nothing made before the
    mount (imports, the lowers' roots) is scanned again."""
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST, gen1, gen2)


class Request:
    __slots__ = ("body", "gid", "nodeid", "opcode", "pid", "uid", "unique")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int,
                 body: memoryview | bytes) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.body = body


class Defer(Exception):
    """Raised by a handler on the loop thread: serve this request on a worker instead."""


class Filesystem(Protocol):
    lock: threading.Lock
    requests_waiting: Callable[[], bool]
    kernel_flags: int
    """The INIT flags both sides agreed on; set before the first request after INIT."""
    wants_passthrough: bool
    """Whether to ask the kernel for FUSE_PASSTHROUGH at INIT."""
    device_fd: int
    """The connection's descriptor, for its ioctls; set by the session."""

    def handlers(self) -> dict[int, Callable[[Request], Reply]]: ...


class Session:
    def __init__(self, fd: int, fs: Filesystem, *, strict: bool = False) -> None:
        self._fd = fd
        self._fs = fs
        self._lock = fs.lock
        self._handlers = fs.handlers()
        self._strict = strict
        self._pool: ThreadPoolExecutor | None = None  # made once the mount is up
        self._changes = threading.Condition()
        self._changes_running = 0
        self._deferred = 0  # requests on workers: the loop then sleeps instead of spinning
        self._frozen = False
        self._held: list[Request] = []
        self._signals: list[int] = []
        self._wake_r = -1  # the signal wakeup pipe, while `run` runs
        self._stop = False
        self.loop_thread = threading.get_ident()
        self._queue = select.poll()
        self._queue.register(fd, select.POLLIN)
        fs.requests_waiting = self.requests_waiting
        fs.device_fd = fd

    def requests_waiting(self) -> bool:
        """Whether the kernel has another request for us right now."""
        return bool(self._queue.poll(0))

    # ------------------------------------------------------------------ the loop
    def run(self, ready: Callable[[], None], on_signal: Callable[[int], None]) -> None:
        """Serve until unmounted or stopped; `ready` once INIT is answered; signals on the
        main thread go to `on_signal` between requests."""
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        _tune_gc()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._wake_r = wake_r
        served = 0
        try:
            os.set_blocking(self._fd, False)
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            poller.register(wake_r, select.POLLIN)
            initialized = False
            while not self._stop:
                served += 1
                if not served % _SIGNAL_CHECK_EVERY:
                    self._drain_wakeup()  # a busy loop never waits in poll to see them
                if self._signals:
                    self._take_signals(on_signal)
                    continue
                n = self._read(view, poller)
                if n is None:
                    continue
                if n == 0:
                    break
                if not initialized:
                    self._init(view[:n])
                    initialized = True
                    ready()
                    self._start_worker()
                    continue
                self._serve(view[:n])
        finally:
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def catch(self, signum: int) -> None:
        """The Python-level handler of the session's signals: nothing to do. Their numbers
        reach the loop through the wakeup pipe, which the C-level handler writes whichever
        thread the kernel picked; the Python handler runs only once the main thread runs
        Python code, which the compiled loop may not do for a long time."""

    def _drain_wakeup(self) -> None:
        """Take the signal numbers that the wakeup pipe holds."""
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        self._signals.extend(data)

    def stop(self) -> None:
        self._stop = True

    def _take_signals(self, on_signal: Callable[[int], None]) -> None:
        while self._signals:
            on_signal(self._signals.pop(0))

    def _read(self, view: memoryview, poller: select.poll) -> int | None:
        """The next request's length; 0 once unmounted; None to look at signals first."""
        while True:
            try:
                return os.readv(self._fd, [view])
            except BlockingIOError:
                pass
            except InterruptedError:
                return None
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted meanwhile
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    return 0
                raise
            if self._signals or not self._wait(poller):
                return None

    def _wait(self, poller: select.poll) -> bool:
        """Wait for the next request: False if signals came first.

        A client that got its reply usually sends the next request within microseconds: the
        loop looks for it with poll(0) for a while before it sleeps in poll(2), whose wakeup
        costs more. It looks with poll, not by reading: every empty read raises an exception,
        and that costs more than the syscall.
        """
        # Spinning holds the GIL: a worker serving a deferred request would wait for it.
        if not self._deferred:
            deadline = time.perf_counter() + SPIN_SECONDS
            while time.perf_counter() < deadline:
                if self._queue.poll(0):
                    return True
                # The client may be waiting for this very vCPU (after a wake-up on its CPU,
                # say at the end of an fsync): spinning would keep it from sending its next
                # request. Alone on its CPU, the loop gets it straight back.
                os.sched_yield()
        poller.poll()
        self._drain_wakeup()
        return not self._signals

    def _init(self, request: memoryview) -> None:
        _len, opcode, unique, *_ = P.IN_HEADER.unpack_from(request)
        if opcode != P.Op.INIT:
            raise OSError(errno.EPROTO, f"FUSE: first request is {opcode}, not INIT")
        major, minor, max_readahead, flags = P.INIT_IN.unpack_from(request, P.IN_HEADER.size)
        if major != P.KERNEL_MAJOR:
            self._reply_error(unique, errno.EPROTO)
            raise OSError(errno.EPROTO, f"FUSE: kernel speaks protocol {major}.{minor}")
        flags2_at = P.IN_HEADER.size + P.INIT_IN.size
        if flags & P.INIT_EXT and len(request) >= flags2_at + P.INIT_IN_FLAGS2.size:
            flags |= P.INIT_IN_FLAGS2.unpack_from(request, flags2_at)[0] << 32
        wanted = _WANTED_FLAGS | (P.INIT_EXT | P.PASSTHROUGH if self._fs.wants_passthrough else 0)
        flags &= wanted
        self._fs.kernel_flags = flags
        reply = P.INIT_OUT.pack(
            P.KERNEL_MAJOR, min(minor, P.KERNEL_MINOR), max_readahead, flags & 0xFFFFFFFF,
            64, 48,  # max_background, congestion_threshold: readahead and async reads in flight
            MAX_WRITE, 1, MAX_WRITE // P.PAGE_SIZE, 0, flags >> 32,
            P.MAX_STACK_DEPTH if flags & P.PASSTHROUGH else 0,
        )
        self._reply(unique, reply)

    # ------------------------------------------------------------------ serving
    def _serve(self, request: memoryview) -> None:
        _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = P.IN_HEADER.unpack_from(request)
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode not in (P.Op.INTERRUPT, P.Op.FORGET, P.Op.BATCH_FORGET):
                self._reply_error(unique, errno.ENOSYS)
            return
        req = Request(opcode, unique, nodeid, uid, gid, pid, request[P.IN_HEADER.size:])
        if self._frozen and self._is_change(req):
            req.body = bytes(req.body)
            self._held.append(req)
            return
        try:
            with self._lock:
                reply = handler(req)
        except Defer:
            req.body = bytes(req.body)
            self._defer(handler, req)
            return
        except OSError as exc:
            self._reply_error(unique, exc.errno or errno.EIO)
            return
        except Exception:
            self._internal_error(req)
            return
        if reply is not None:
            self._reply(unique, reply)

    def _defer(self, handler: Callable[[Request], Reply], req: Request) -> None:
        change = self._is_change(req)
        if change:
            with self._changes:
                self._changes_running += 1
        with self._changes:
            self._deferred += 1
        self._worker_pool().submit(self._serve_on_worker, handler, req, change)

    def _worker_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(WORKERS, "layerfs-worker")
        return self._pool

    def _start_worker(self) -> None:
        """Start one worker once the mount is up, so that the first deferred request (the
        copy-up of a big file, often a clone of a few hundred microseconds) does not pay for
        a thread's start."""
        self._worker_pool().submit(int)

    def _serve_on_worker(self, handler: Callable[[Request], Reply], req: Request,
                         change: bool) -> None:
        try:
            with self._lock:
                reply = handler(req)
        except OSError as exc:
            self._reply_error(req.unique, exc.errno or errno.EIO)
        except Exception:
            self._internal_error(req)
        else:
            if reply is not None:
                self._reply(req.unique, reply)
        finally:
            with self._changes:
                self._deferred -= 1
                if change:
                    self._changes_running -= 1
                    self._changes.notify_all()

    @staticmethod
    def _is_change(req: Request) -> bool:
        if req.opcode == P.Op.OPEN:
            flags, _ = P.OPEN_IN.unpack_from(req.body)
            return bool(flags & _WRITE_OPEN)
        return req.opcode in _MUTATING

    def _internal_error(self, req: Request) -> None:
        log.exception("internal error in %s", P.Op(req.opcode).name)
        self._reply_error(req.unique, errno.EIO)
        if self._strict:  # the tests: stop as SIGTERM would, unmounting
            self._signals.append(signal.SIGTERM)

    def _reply(self, unique: int, payload: bytes | Sequence[bytes | memoryview]) -> None:
        parts: list[bytes | memoryview]
        if isinstance(payload, bytes):
            parts = [P.OUT_HEADER.pack(P.OUT_HEADER.size + len(payload), 0, unique), payload]
        else:
            size = P.OUT_HEADER.size + sum(len(part) for part in payload)
            parts = [P.OUT_HEADER.pack(size, 0, unique), *payload]
        self._write(parts)

    def _reply_error(self, unique: int, err: int) -> None:
        self._write([P.OUT_HEADER.pack(P.OUT_HEADER.size, -err, unique)])

    def _write(self, parts: Sequence[bytes | memoryview]) -> None:
        try:
            os.writev(self._fd, parts)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel gave up on the request
                raise

    # ------------------------------------------------------------------ freezing
    def freeze(self) -> None:
        """Hold every new change; return once the changes running on workers are done."""
        self._frozen = True
        with self._changes:
            while self._changes_running:
                self._changes.wait()

    def thaw(self) -> None:
        self._frozen = False
        held, self._held = self._held, []
        for req in held:
            self._serve_held(req)

    def _serve_held(self, req: Request) -> None:
        header = P.IN_HEADER.pack(P.IN_HEADER.size + len(req.body), req.opcode, req.unique,
                                  req.nodeid, req.uid, req.gid, req.pid, 0, 0)
        self._serve(memoryview(header + bytes(req.body)))
