"""The batch worker in a child process: `ProcessScheduler` (`aigc serve --worker-process`).

In one process the scheduler's worker thread and the event loop share the GIL: the per-token
Python of a small model and the per-request Python of the HTTP side run one at a time, and a thread
that gives the GIL up (every torch op does) waits to get it back. Here a child process runs a
`batching.Scheduler` on its own copy of the model and the server keeps only the asyncio side.

    parent (server)                                child (`python -c ... worker_main()`)
    submit: tokenize + resolve (`_requests`)  ->    ("submit", [(id, prompt, ids, params, t0), ...])
    cancel / close                            ->    ("cancel", id) / ("close",)
    event loop (or a reader thread):          <-    one list per step: (id, kind, index, payload)
      rows' `emit`, metrics

Messages go over two socket pairs, commands one way and events the other
(`multiprocessing.connection.Connection` framing, pickled; our own objects between our own
processes, nothing read from disk). Unix only: the sockets are passed by file descriptor.

The child runs one thread: its scheduler reads the commands itself between two steps
(`Scheduler(inbox=...).run()`). With a second thread receiving them, that thread had to win the
GIL from the decoding one and a request waited up to ~10 ms to join the batch.

Given the server's event loop, the parent reads events on the loop itself (`loop.add_reader`, a
non-blocking socket): no reader thread taking the GIL from the loop ~1,500 times a second under 16
streams, and the rows' callbacks wake their streams without a cross-thread hop. Without a loop (the
API used from plain threads) a reader thread does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import select
import struct
import threading
from collections.abc import Callable
from typing import Any

import torch

from aigc.errors import AigcError
from aigc.generation.params import GenerationParams
from aigc.serve.batching import Emit, QueueFull, Row, Scheduler, Ticket, hold_for_turn, on_loop
from aigc.serve.settings import settle_gc


class ProcessScheduler:
    """`Scheduler`'s interface (`submit`, `load`, `close`, tickets with `cancel()`) with the
    decoding in a child process; the parent still tokenizes and resolves each request, so its
    errors are raised in the caller as with `Scheduler.submit`."""

    def __init__(
        self,
        gen: Any,
        spec: str,
        dtype: str | None = None,
        max_batch: int = 32,
        max_rows: int = 256,
        metrics: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        self.gen, self.max_rows, self.metrics = gen, max_rows, metrics
        cmd, cmd_child = socket.socketpair()  # commands, parent -> child
        evt, evt_child = socket.socketpair()  # events, child -> parent
        code = "from aigc.serve.worker import worker_main; worker_main()"
        fds = [cmd_child.fileno(), evt_child.fileno()]
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, fds)], pass_fds=fds)
        cmd_child.close()
        evt_child.close()
        self.conn = Connection(cmd.detach())
        self.events = Connection(evt.detach())
        self.conn.send(("init", spec, dtype, max_batch, torch.get_num_threads(), gen.model_id))
        try:
            [(_, kind, _, detail)] = self.events.recv()  # after the child has loaded the model
        except (EOFError, OSError):
            kind, detail = "failed", f"exit code {self.proc.wait()}"
        if kind != "ready":
            self.conn.close()
            self.events.close()
            self._reap()  # not left exiting (or a zombie) behind the error
            raise AigcError(f"the batch worker process could not load {spec}: {detail}")
        self.lock = threading.Lock()  # calls, load, sends
        self.calls: dict[int, list] = {}  # request id -> [emit, rows not done]
        self.load = 0  # rows waiting or running
        self.closed = False
        self._next = 0
        self._held: list[tuple] = []  # submits to send at the end of this loop turn
        self.loop, self.thread = loop, None
        self._buf = bytearray()  # event bytes read on the loop, not yet a whole message
        self._attached = False  # the loop watches the events socket
        self._ended = threading.Event()  # the child's event stream ended and was handled
        if loop is None:
            self.thread = threading.Thread(
                target=self._read, name=f"aigc-batch-reader-{gen.model_id}", daemon=True
            )
            self.thread.start()
        else:
            os.set_blocking(self.events.fileno(), False)
            loop.call_soon_threadsafe(self._attach)

    def _reap(self) -> None:
        """Wait for the child to exit (its commands closed or sent "close"); kill it after 30 s."""
        import subprocess

        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def alive(self) -> bool:
        """Whether the child still runs (False after `close` or a crash). On the loop that reads
        its events no process is polled (a wait syscall per request, and the GIL handed over under
        load): a child that exits closes its events socket, and the loop reads that end (`_end`
        marks the scheduler closed) in the turn it is seen, before it runs a request that came
        after it."""
        return not self.closed and (on_loop(self.loop) or self.proc.poll() is None)

    def submit(self, prompt: str, params: GenerationParams, emit: Emit) -> Ticket:
        """As `Scheduler.submit`."""
        if params.num_beams > 1:
            raise AigcError(
                "num_beams > 1 is not served (beam search decodes alone); use n for several samples"
            )
        ids, row_params = self.gen._requests(prompt, params)
        rows = [Row(prompt, ids, p, k, emit) for k, p in enumerate(row_params)]
        with self.lock:
            if self.closed or self.load + len(rows) > self.max_rows:
                raise QueueFull
            rid, self._next = self._next, self._next + 1
            self.calls[rid] = [emit, len(rows)]
            self.load += len(rows)
            # perf_counter is CLOCK_MONOTONIC on Linux, one clock for both processes: the child's
            # wait and time-to-first-token metrics count from here
            msg = (rid, prompt, ids, row_params, rows[0].submitted)
            if not hold_for_turn(self.loop, self._held, [msg], self._send_held):  # see `_send_held`
                self._send(("submit", [msg]))
        return _RemoteTicket(self, rid, rows)

    def _send(self, command: tuple) -> None:
        """Send a command (holding the lock), after the submits held for this loop turn."""
        if self._held:
            held, self._held = self._held, []
            self.conn.send(("submit", held))
        self.conn.send(command)

    def _send_held(self) -> None:
        """On the loop, at the end of the turn in which a request was submitted: the submits of
        every request the loop took in during that turn, as one command.

        Requests that arrive together (a burst of clients) reach the loop together, and each one's
        handler runs to its submit in the same turn. Sent one by one, the child started decoding the
        first alone and took the others in one or two at a time, each join slowing a step; sent
        together they join in one step and run in step. The first request waits for the rest of
        its turn (~40 us alone; the 16-client bench: 1-2 ms for 13-15 requests, which it repays):
        16 clients +7.5 %, one client within noise (bench/bench_serve.py, docs/benchmarks.md)."""
        with self.lock:
            if not self._held or self.closed:  # (`close` sent them before its own command)
                return
            held, self._held = self._held, []
            # a child gone meanwhile: its events end, and `_end` fails these calls with the others
            with contextlib.suppress(OSError):
                self.conn.send(("submit", held))

    def _cancel(self, rid: int) -> None:
        with self.lock:
            call = self.calls.pop(rid, None)
            if call is None or self.closed:
                return
            self.load -= call[1]
            self._send(("cancel", rid))

    def _read(self) -> None:
        """The reader thread (no event loop): each step's events until the child exits."""
        while True:
            try:
                items = self.events.recv()
            except (EOFError, OSError):
                break
            self._dispatch(items)
        self._end()

    def _attach(self) -> None:
        """On the loop: read the events there from now on."""
        if not self._ended.is_set():  # (not drained by a `close` before this ran)
            self.loop.add_reader(self.events.fileno(), self._readable)
            self._attached = True

    def _pull(self) -> bool:
        """Read the events socket into the buffer until it has nothing more (non-blocking) or ends
        (blocking: the child exited) -> True at its end."""
        while True:
            try:
                data = os.read(self.events.fileno(), 1 << 18)
            except BlockingIOError:
                return False
            except OSError:
                data = b""
            if not data:
                return True
            self._buf += data

    def _readable(self) -> None:
        """On the loop: take what the socket holds, hand over every whole message in it."""
        eof = self._pull()
        self._messages()
        if eof:
            self.loop.remove_reader(self.events.fileno())
            self._attached = False
            self._end()

    def _messages(self) -> None:
        """Dispatch the whole messages at the start of the buffer (Connection's framing: a signed
        4-byte length, or -1 and an 8-byte one, then the pickle)."""
        buf, at = self._buf, 0
        while len(buf) - at >= 4:
            (size,), head = struct.unpack_from("!i", buf, at), 4
            if size == -1:
                if len(buf) - at < 12:
                    break
                (size,), head = struct.unpack_from("!Q", buf, at + 4), 12
            if len(buf) - at - head < size:
                break
            self._dispatch(pickle.loads(buf[at + head : at + head + size]))
            at += head + size
        del buf[:at]

    def _dispatch(self, items: list) -> None:
        for rid, kind, index, payload in items:
            if kind == "metric":
                if self.metrics is not None:
                    getattr(self.metrics, index)(*payload)
                continue
            with self.lock:
                call = self.calls.get(rid)
                if call is None:  # cancelled meanwhile
                    continue
                if kind != "delta":
                    call[1] -= 1
                    self.load -= 1
                    if not call[1]:
                        del self.calls[rid]
            call[0](kind, index, payload)

    def _end(self) -> None:
        """The child's events ended (it exited): whatever it still held fails cleanly."""
        with self.lock:
            calls, self.calls, self.load, self.closed = self.calls, {}, 0, True
        for emit, _ in calls.values():
            emit("error", 0, "the model's worker process stopped; retry the request")
        self._ended.set()

    def _drain(self) -> None:
        """Wait for the child's last events (`close`). On the loop's own thread, or with the loop
        stopped, nothing else would read them: read here, blocking, until the child exits."""
        if self.thread is not None:
            self.thread.join(timeout=30)
            return
        if not on_loop(self.loop) and self.loop.is_running():
            self._ended.wait(timeout=30)
            return
        if self._ended.is_set():
            return
        fd = self.events.fileno()
        if self._attached:
            self.loop.remove_reader(fd)
        os.set_blocking(fd, True)
        self._pull()  # blocking: until the child exits
        self._messages()
        self._end()

    def close(self) -> None:
        """Stop the worker after its running rows (rows still waiting get an error)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                with contextlib.suppress(OSError):  # the child may be gone already
                    self._send(("close",))
        self._drain()
        self._reap()
        self.conn.close()
        if self._ended.is_set():  # (else the loop may still watch it: a 30 s drain timed out)
            self.events.close()


class _RemoteTicket(Ticket):
    def __init__(self, sched: ProcessScheduler, rid: int, rows: list[Row]) -> None:
        super().__init__(rows)
        self.sched, self.rid = sched, rid

    def cancel(self) -> None:
        super().cancel()
        self.sched._cancel(self.rid)


class _Outbox:
    """The child's side: events and metrics of one step, sent to the parent as one message. (Used
    by the scheduler's one thread only.)"""

    def __init__(self, conn: Any) -> None:
        self.conn, self.items = conn, []
        self.events = 0  # text / result / error items among `items`

    def emit_for(self, rid: int, rows: int, done: Callable[[int], None]) -> Emit:
        left = [rows]

        def emit(kind: str, index: int, payload: Any) -> None:
            self.items.append((rid, kind, index, payload))
            self.events += 1
            if kind != "delta":
                left[0] -= 1
                if not left[0]:
                    done(rid)

        return emit

    def _metric(self, name: str, *args: Any) -> None:
        self.items.append((None, "metric", name, args))

    def observe_wait(self, seconds: float) -> None:
        self._metric("observe_wait", seconds)

    def observe_ttft(self, seconds: float) -> None:
        self._metric("observe_ttft", seconds)

    def observe_step(self, batch: int, seconds: float) -> None:
        self._metric("observe_step", batch, seconds)

    def flush(self, force: bool = False) -> None:
        """Send what the step produced; metrics alone wait for the next events, 256 of them or the
        batch going idle (`force`), so a step that hands over no text costs no message."""
        if not self.items or not (self.events or force or len(self.items) >= 256):
            return
        items, self.items, self.events = self.items, [], 0
        self.conn.send(items)


def worker_main() -> None:
    """The child process of `ProcessScheduler` (argv[1]: the socket's file descriptor)."""
    import sys
    from multiprocessing.connection import Connection

    conn, events = Connection(int(sys.argv[1])), Connection(int(sys.argv[2]))  # commands in, events out
    _, spec, dtype, max_batch, threads, model_id = conn.recv()
    torch.set_num_threads(threads)
    try:
        from aigc.generation import load_generator

        gen = load_generator(spec, dtype=getattr(torch, dtype) if dtype else None)
        gen.model_id = model_id
    except Exception as e:  # the parent raises it as an AigcError
        events.send([(None, "failed", 0, f"{type(e).__name__}: {e}")])
        return
    settle_gc()  # the model is loaded: its objects are start-up state
    out = _Outbox(events)
    tickets: dict[int, Ticket] = {}
    poller = select.poll()  # once per step: 0.2-0.4 us; Connection.poll builds a selector each call, 2-4
    poller.register(conn.fileno(), select.POLLIN)

    def inbox(idle: bool) -> None:
        """The parent's commands so far (waiting for one when idle), between two steps."""
        while not sched.closed and (idle or poller.poll(0)):
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = ("close",)
            if msg[0] == "submit":  # one or more requests: they join the batch together
                for rid, prompt, ids, row_params, submitted in msg[1]:
                    emit = out.emit_for(rid, len(row_params), lambda r: tickets.pop(r, None))
                    rows = [Row(prompt, ids, p, k, emit, submitted) for k, p in enumerate(row_params)]
                    tickets[rid] = sched.enqueue(rows)
            elif msg[0] == "cancel":
                t = tickets.pop(msg[1], None)
                if t is not None:
                    t.cancel()
            else:  # "close": the running rows end, the waiting ones get an error
                sched.close()
            idle = not (sched.pending or sched.rows)  # (a cancel of a finished request)

    # one thread: the scheduler reads the commands itself between steps (`Scheduler.run`); the
    # parent bounds the rows
    sched = Scheduler(gen, max_batch=max_batch, max_rows=1 << 30, metrics=out, inbox=inbox)
    sched.after_step = lambda: out.flush(force=not sched.rows and not sched.pending)
    events.send([(None, "ready", 0, None)])
    sched.run()
    out.flush(force=True)
    conn.close()
    events.close()
