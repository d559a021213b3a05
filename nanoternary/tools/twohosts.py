"""Two machines on one Linux kernel, for tests and benchmarks of training across hosts.

    sudo python -m nanoternary.tools.twohosts -- python $PWD/train.py --data $PWD/my.parquet --batch-size 8
    sudo python -m nanoternary.tools.twohosts --rate 1gbit -- python $PWD/train.py ...    # a 1 Gbit/s link

Each "host" is a network namespace with its own host name (a UTS namespace), its own address on one
end of a veth pair (10.77.0.1 and 10.77.0.2: they exist only inside these namespaces, nothing leaves
the machine), its own /etc/hosts naming both, and its own disk: a folder of its own mounted (in a
mount namespace of its own) over the same path, the working folder, so `data/` and `--out` land on
that host's disk alone. MPICH's `mpiexec -f hosts` starts on host1 and reaches host2 through a
launcher that enters host2's namespaces where it would run ssh (`-launcher ssh -launcher-exec`).

Two processes on one kernel talk through shared memory, whatever their host names, unless the
transport is told otherwise: UCX (MPICH's network module here) finds its shared-memory transports
between them. UCX_TLS=tcp,self (set by run()) leaves UCX only TCP, as between two real machines, and
the veth's byte counters (link_bytes()) show that the traffic crossed it.

Needs root (namespaces, mounts, links), iproute2's `ip` and `tc`, util-linux's `unshare` and
`mount`, and `hostname`: why_not() says what is missing. Everything is removed by close() (processes, namespaces, veth),
also after a failure: use it as a context manager.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HOSTS = ("host1", "host2")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
PREFIX = 24


def why_not():
    """None when this machine can build the two hosts, else the reason it cannot (for skips)."""
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces, veth links)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux"), ("mount", "util-linux"),
                          ("hostname", "hostname")):
        if shutil.which(tool) is None:
            return f"no `{tool}` ({package})"
    probe = f"ntprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` fails here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args, check=True):
    res = subprocess.run(args, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


ENTER = """#!/bin/sh
# enter HOST CMD...: run CMD on "machine" HOST: its network namespace, its host name, its disk
# mounted over the working folder, its /etc/hosts. (nanoternary/tools/twohosts.py wrote this.)
host=$1; shift
case $host in
{cases}
  *) echo "enter: no host $host here" >&2; exit 255;;
esac
exec ip netns exec "$ns" unshare --uts --mount sh -c '
  hostname "$0" && mount --bind "$1" {work} && mount --bind {etc_hosts} /etc/hosts && cd {work} && shift && exec "$@"
' "$host" "$disk" "$@"
"""

LAUNCH = """#!/bin/sh
# mpiexec's ssh: Hydra calls `ssh -x HOST "COMMAND"`; this runs COMMAND on HOST by entering its
# namespaces instead of logging in. (nanoternary/tools/twohosts.py wrote this.)
[ "$1" = "-x" ] && shift
host=$1; shift
exec {enter} "$host" sh -c "$*"
"""


class TwoHosts:
    """host1 and host2 joined by a veth pair; see the module docstring. Folders under `base`:
    disk-host1, disk-host2 (each host's disk), work (where each host sees its own disk), the host
    file `hosts`, and the scripts `enter` and `launch`."""

    def __init__(self, base=None):
        self.base = os.path.abspath(base or tempfile.mkdtemp(prefix="twohosts-"))
        tag = f"{os.getpid() % 1000000}"
        self.netns = {h: f"nt{tag}{h[-1]}" for h in HOSTS}      # unique per process: tests may run at once
        self.veth = {h: f"ntv{tag}{h[-1]}" for h in HOSTS}
        self.addr = dict(zip(HOSTS, ADDRESSES))
        self.work = os.path.join(self.base, "work")
        self.disks = {h: os.path.join(self.base, f"disk-{h}") for h in HOSTS}
        self.hostfile = os.path.join(self.base, "hosts")
        self.enter = os.path.join(self.base, "enter")
        self.launch = os.path.join(self.base, "launch")
        self.made = []
        self.procs = []

    # ------------------------------------------------------------------ building and removing

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        for path in [self.work, *self.disks.values()]:
            os.makedirs(path, exist_ok=True)
        for h in HOSTS:
            sh("ip", "netns", "add", self.netns[h])
            self.made.append(self.netns[h])
        h1, h2 = HOSTS
        sh("ip", "link", "add", self.veth[h1], "netns", self.netns[h1], "type", "veth",
           "peer", "name", self.veth[h2], "netns", self.netns[h2])
        for h in HOSTS:
            ns = self.netns[h]
            sh("ip", "-n", ns, "addr", "add", f"{self.addr[h]}/{PREFIX}", "dev", self.veth[h])
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", self.veth[h], "up")
        self.wait_link(True)
        etc_hosts = os.path.join(self.base, "etc_hosts")
        with open(etc_hosts, "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"{self.addr[h]} {h}\n" for h in HOSTS))
        with open(self.hostfile, "w") as f:
            f.write("".join(f"{h}:1\n" for h in HOSTS))
        cases = "\n".join(f"  {h}) ns={self.netns[h]}; disk={self.disks[h]};;" for h in HOSTS)
        for path, text in ((self.enter, ENTER.format(cases=cases, work=self.work, etc_hosts=etc_hosts)),
                           (self.launch, LAUNCH.format(enter=self.enter))):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o755)

    def close(self):
        """Kill every process in the namespaces (mpiexec, its proxies, the ranks), then remove the
        namespaces; the veth pair goes with them."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for _ in range(3):
            pids = [int(x) for ns in self.made for x in sh("ip", "netns", "pids", ns, check=False).split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made = []

    # ------------------------------------------------------------------ the link

    def link(self, up):
        """Plug the cable in or pull it out (host2's end of the veth up or down)."""
        sh("ip", "-n", self.netns[HOSTS[1]], "link", "set", self.veth[HOSTS[1]], "up" if up else "down")
        self.wait_link(up)

    def wait_link(self, up, timeout=10):
        """Wait until both ends report the link up (or down): a veth has no carrier for a moment
        after `ip link set up`, and UCX leaves out interfaces that are not running when it starts."""
        want = "UP" if up else "DOWN"
        deadline = time.time() + timeout
        while True:
            states = [json.loads(sh("ip", "-n", self.netns[h], "-j", "link", "show", "dev", self.veth[h]))[0]
                      ["operstate"] for h in HOSTS]
            if up and all(s == want for s in states) or not up and want in states:
                return
            if time.time() > deadline:
                raise RuntimeError(f"the veth pair is {states} after {timeout} s, not {want}")
            time.sleep(0.05)

    def shape(self, rate=None, burst="1mb"):
        """Limit both directions of the link to `rate` (tc's units: "1gbit", "10gbit"; None: off)
        with a token bucket (tc tbf; netem is not in every kernel)."""
        for h in HOSTS:
            ns, dev = self.netns[h], self.veth[h]
            sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if rate:
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                   "latency", "20ms")

    def link_bytes(self):
        """Bytes host1's end of the veth has sent and received: what crossed the link."""
        out = sh("ip", "-n", self.netns[HOSTS[0]], "-s", "-j", "link", "show", "dev", self.veth[HOSTS[0]])
        stats = json.loads(out)[0]["stats64"]
        return stats["tx"]["bytes"], stats["rx"]["bytes"]

    # ------------------------------------------------------------------ running things

    def on(self, host, argv):
        """The command line that runs argv on `host`."""
        return [self.enter, host] + list(argv)

    def mpiexec(self, argv, n=2, mpiexec=None):
        """The command line that runs `mpiexec -f hosts -n N argv` on host1, one process per host."""
        mpiexec = mpiexec or shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                                          + os.environ.get("PATH", ""))
        return self.on(HOSTS[0], [mpiexec, "-f", self.hostfile, "-n", str(n), "-launcher", "ssh",
                                  "-launcher-exec", self.launch] + list(argv))

    def env(self, extra=None):
        """The environment: UCX over TCP only (module docstring), and this checkout importable."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.environ.get("PYTHONPATH")
        return {**os.environ, "UCX_TLS": "tcp,self", "PYTHONPATH": root + (os.pathsep + path if path else ""),
                **(extra or {})}

    def popen(self, argv, env=None, **kw):
        p = subprocess.Popen(argv, env=self.env(env), **kw)
        self.procs.append(p)
        return p

    def run(self, argv, env=None, timeout=300):
        """Run a command line of on() or mpiexec() -> CompletedProcess (text, output captured)."""
        p = self.popen(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise RuntimeError(f"{' '.join(argv)}: still running after {timeout} s\n{out[-2000:]}\n{err[-2000:]}")
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run a command under mpiexec on two namespace 'hosts' "
                                             "(module docstring); the hosts are removed afterwards.")
    ap.add_argument("--rate", help="shape the link, e.g. 1gbit or 10gbit (default: as fast as the CPUs go)")
    ap.add_argument("--base", help="folder for the hosts' disks and scripts (default: a new temporary one)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command for every rank")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command: give one after --")
    reason = why_not()
    if reason:
        raise SystemExit(f"error: cannot build two hosts here: {reason}")
    with TwoHosts(a.base) as hosts:
        hosts.shape(a.rate)
        before = hosts.link_bytes()
        print(f"twohosts: host1 {hosts.addr['host1']} and host2 {hosts.addr['host2']}, disks under {hosts.base}, "
              f"working folder {hosts.work}", file=sys.stderr, flush=True)
        p = hosts.popen(hosts.mpiexec(cmd))
        code = p.wait()
        after = hosts.link_bytes()
        print(f"twohosts: the link carried {(after[0] - before[0]) / 1e6:,.1f} MB from host1 and "
              f"{(after[1] - before[1]) / 1e6:,.1f} MB to it", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
