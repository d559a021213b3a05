"""The end of a job that lost one of its processes: MPI itself has no timeout, so a rank whose machine,
link or process is gone leaves the others waiting in a collective call forever (fast/dist.py).

    comm = dist.world()
    comm.watch(30)      # starts a Watchdog: a lost rank now ends the job within 30 s

Each rank keeps a plain TCP connection to rank 0, next to MPI's own, and a thread that sends a byte
on it every second and listens for the other side's. Silence for `timeout` seconds means the machine
or the link is down (nothing arrives at all, not even a reset); a closed connection means the
process ended (killed: the kernel closes its sockets at once). Either way this rank prints one line
naming the lost rank and its host, and aborts the job.
"""
import atexit
import os
import select
import signal
import socket
import sys
import threading
import time


class Watchdog:
    """Signs of life between rank 0 and every other rank, on TCP connections of their own, and the
    end of the job when one stops:

    - every rank sends a byte to its peers (rank 0: every rank; the others: rank 0) each second,
      from a thread, whatever the main thread is doing (MPI and NumPy release Python's lock);
    - a peer whose connection closes (its process ended: killed, or failed) or that has been silent
      for `timeout` seconds (its machine or the link is down: nothing arrives at all) is lost: this
      rank prints one line naming it and its host and calls MPI_Abort from this thread (the main
      thread may sit in a collective call that never returns). mpiexec then ends the job without
      waiting for the lost host's processes (it would wait for them forever after a plain exit),
      and those, finding rank 0 silent in turn, stop themselves the same way;
    - a Ctrl-C or SIGTERM (seen through signal.set_wakeup_fd, even while the main thread sits in an
      MPI call) while a peer has been silent for GRACE seconds stops the job at once, with the same
      line, instead of waiting for a step that cannot finish.

    A peer says "b" (bye) before a normal exit, and "f" when it ends the job itself (comm.fail, or a
    lost peer of its own), so that neither is reported as lost."""
    INTERVAL, GRACE, ENDING = 1.0, 3.0, 10.0

    def __init__(self, world, timeout):
        self.world, self.timeout = world, float(timeout)
        self.me = world.rank
        self.peers = list(range(1, world.size)) if self.me == 0 else [0]
        self.socks = self._connect(world)         # {peer: its connection}
        now = time.monotonic()
        self.heard = {p: now for p in self.peers}  # when each peer still connected was last heard from
        self.said = {p: b"" for p in self.peers}
        self.signal_at, self.signal_name = None, None
        self.wake_r, wake_w = socket.socketpair()
        for s in (self.wake_r, wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._wake_w = wake_w                      # kept open for the life of the process
        atexit.register(self.say, b"b")
        threading.Thread(target=self._run, name="nanoternary-watchdog", daemon=True).start()

    def _connect(self, world):
        """rank 0 listens on every address; the others connect to rank 0's host name, as resolved on
        their own machine (the name mpiexec's host file used) -> {peer: socket}."""
        comm, socks, error = world.comm, {}, None
        if self.me == 0:
            dual = socket.has_dualstack_ipv6()
            server = socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                                          dualstack_ipv6=dual)
            server.settimeout(30)
            port = server.getsockname()[1]
        host0 = world.hosts[0][0]
        port = comm.bcast(port if self.me == 0 else None, root=0)
        if self.me:
            names = [host0] + (["127.0.0.1"] if world.hosts[self.me][0] == host0 else [])
            for name in names:
                try:
                    s = socket.create_connection((name, port), timeout=30)
                    s.sendall(f"{self.me}\n".encode())
                    socks[0] = s
                    break
                except OSError as e:
                    error = f"rank {self.me} on {world.hosts[self.me][0]} cannot reach rank 0 at {name}:{port} " \
                            f"({e}): {host0} must resolve to its network address on every machine"
        else:
            try:
                for _ in self.peers:
                    s, _ = server.accept()
                    s.settimeout(30)
                    rank = int(s.recv(16).split(b"\n")[0])
                    socks[rank] = s
            except (OSError, ValueError) as e:
                error = f"rank 0 on {host0}: not every rank connected for the watchdog ({e})"
            server.close()
        errors = [e for e in comm.allgather(error) if e]
        if errors:
            raise ConnectionError(errors[0] + "; or run without the watchdog (--peer-timeout 0)")
        for s in socks.values():
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return socks

    def say(self, what):
        for s in self.socks.values():
            try:
                s.send(what)
            except OSError:
                pass

    def _run(self):
        last_loop = next_beat = time.monotonic()
        ending = None                   # when a peer that said "f" went: it is ending the job (MPI_Abort)
        while True:
            now = time.monotonic()
            if now - last_loop > self.timeout / 2:     # this process was not running (suspended, swapped):
                self.heard = {p: now for p in self.heard}   # the silence was ours, not theirs
            last_loop = now
            if now >= next_beat:
                self.say(b".")
                next_beat = now + self.INTERVAL
            ready, _, _ = select.select([*self.socks.values(), self.wake_r], [], [], max(0.0, next_beat - now))
            now = time.monotonic()
            for s in ready:
                if s is self.wake_r:
                    self._signalled(s.recv(64), now)
                else:
                    ending = self._read(s, now) or ending
            if ending is not None and now - ending > self.ENDING:    # it did not manage to: end it from here
                self.stop(None, code=1)
            for p, t in self.heard.items():
                silent = now - t
                if silent > self.timeout:
                    self.stop(p, f"no sign of life for {silent:.0f} s (its machine, or the link to it, is down)")
                if self.signal_at is not None and silent > self.GRACE:
                    self.stop(p, f"no sign of life for {silent:.0f} s when {self.signal_name} arrived")

    def _read(self, s, now):
        """What peer p sent: signs of life, "b", "f", or the end of its connection (-> the time it
        ended after saying "f", so that its own MPI_Abort, with its message, ends the job)."""
        p = next(q for q, sock in self.socks.items() if sock is s)
        try:
            data = s.recv(4096)
        except OSError as e:
            data, why = b"", f"its connection broke ({e.strerror or e})"
        else:
            why = "its process ended"
        if data:
            self.heard[p] = now
            self.said[p] += data.replace(b".", b"")
            return None
        self.socks.pop(p).close()
        del self.heard[p]
        if b"b" in self.said[p]:                  # said goodbye: a normal end
            return None
        if b"f" in self.said[p]:
            return now
        self.stop(p, why)

    def _signalled(self, data, now):
        for n in data:
            if n in (signal.SIGINT, signal.SIGTERM):
                self.signal_at, self.signal_name = now, signal.Signals(n).name

    def stop(self, p, why=None, code=None):
        """End this process: a lost peer p (one line naming it), or None (a peer ended the job)."""
        if code is None:
            code = {"SIGINT": 130, "SIGTERM": 143}.get(self.signal_name, 1)
        self.say(b"f")
        if p is not None:
            host, pid = self.world.hosts[p]
            me, my_host = self.me, self.world.hosts[self.me][0]
            print(f"rank {me} on {my_host}: lost rank {p} on {host} (pid {pid}): {why}; stopping the job "
                  f"(what was saved is intact: continue with --resume, with any number of processes)",
                  file=sys.stderr, flush=True)
            time.sleep(0.5)             # the line travels through mpiexec's proxy: an abort would overtake it
        threading.Timer(5.0, os._exit, (code,)).start()    # in case MPI_Abort cannot end this process
        self.world.comm.Abort(code)     # not just exit: mpiexec waits for a lost host's processes, not after an abort
