#!/usr/bin/env python3
"""Rehearses deploy/compose.yaml without a container engine.

Each Compose service runs as a local process in its own network namespace
(as a container has), on a bridge of their own, with /etc/netns/NS/hosts
mapping the service names to their addresses (what Compose's DNS does).
The command lines and configuration files are the recipe's own; only the
paths that Compose would mount (configuration files, named volumes,
secrets) are rewritten to scratch paths, in the arguments and in copies of
the mounted configuration files.

Then it checks what a user would: a client subscribed through one balancer
gets a message published through the other (across nodes), and still gets
what was published after the node holding its session is killed.

`rehearse.py MQLB statefulset RENDERED.yaml` runs a rendered Kubernetes
StatefulSet's init and start commands for each ordinal instead, as its
pods would (HOSTNAME, the Service's DNS names, the ConfigMap and Secrets as
files), and checks that the peers they derive form one cluster.

Needs root (network namespaces), `ip`, mosquitto_pub and mosquitto_sub.
Usage: rehearse.py MQLB_BINARY [COMPOSE_FILE]
       rehearse.py MQLB_BINARY statefulset RENDERED_YAML
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import json
import re

import yaml

SUBNET = "10.213.7"


def repath(text, dst, host):
    """Replaces the container path `dst` with `host` where it is a whole
    path or a path's leading directory (not "/ca" in "/ca.pem")."""
    return re.sub(r"(?<![\w./-])" + re.escape(dst) + r"(?=/|$|[^\w.-])", lambda _: host, text)


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Topology:
    def __init__(self, mqlb, compose=None, names=None, aliases=None):
        self.mqlb = os.path.abspath(mqlb)
        if compose:
            self.compose = os.path.abspath(compose)
            self.base = os.path.dirname(self.compose)
            self.spec = yaml.safe_load(open(self.compose))
            names = list(self.spec["services"])
        self.tag = f"mqlbr{os.getpid()}"
        self.scratch = tempfile.mkdtemp(prefix="mqlb-rehearsal-")
        self.hub = f"{self.tag}hub"
        self.names = names
        # Further names each host answers to (a pod's Service DNS name).
        self.aliases = aliases or {}
        self.ip = {n: f"{SUBNET}.{10 + i}" for i, n in enumerate(self.names)}
        self.ns = {n: f"{self.tag}s{i}" for i, n in enumerate(self.names)}
        self.procs = {}

    # Network: a hub namespace with a bridge, one namespace per service.
    def up(self):
        sh("ip", "netns", "add", self.hub)
        self.hub_exec("ip", "link", "add", "br0", "type", "bridge")
        self.hub_exec("ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        self.hub_exec("ip", "link", "set", "br0", "up")
        self.hub_exec("ip", "link", "set", "lo", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{ip} {n} {' '.join(self.aliases.get(n, []))}\n" for n, ip in self.ip.items()
        )
        for i, n in enumerate(self.names):
            ns = self.ns[n]
            sh("ip", "netns", "add", ns)
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            open(f"/etc/netns/{ns}/hosts", "w").write(hosts)
            host_end, ns_end = f"{self.tag}h{i}", f"{self.tag}c{i}"
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            sh("ip", "link", "set", host_end, "netns", self.hub)
            sh("ip", "link", "set", ns_end, "netns", ns)
            self.hub_exec("ip", "link", "set", host_end, "master", "br0")
            self.hub_exec("ip", "link", "set", host_end, "up")
            self.in_ns(n, "ip", "link", "set", "lo", "up")
            self.in_ns(n, "ip", "addr", "add", f"{self.ip[n]}/24", "dev", ns_end)
            self.in_ns(n, "ip", "link", "set", ns_end, "up")
        os.makedirs(f"/etc/netns/{self.hub}", exist_ok=True)
        open(f"/etc/netns/{self.hub}/hosts", "w").write(hosts)

    def hub_exec(self, *args, check=True):
        return sh("ip", "netns", "exec", self.hub, *args, check=check)

    def in_ns(self, name, *args):
        return sh("ip", "netns", "exec", self.ns[name], *args)

    def down(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in list(self.ns.values()) + [self.hub]:
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    # Paths Compose would mount, rewritten to scratch paths.
    def mounts(self, name):
        svc = self.spec["services"][name]
        out = []
        for v in svc.get("volumes", []):
            src, dst = v.split(":")[:2]
            if src.startswith("."):
                host = os.path.normpath(os.path.join(self.base, src))
                if dst.endswith(".toml"):
                    host = self.rewritten_copy(name, host)
            else:
                host = os.path.join(self.scratch, "volumes", src)
                os.makedirs(host, exist_ok=True)
            out.append((dst, host))
        for s in svc.get("secrets", []):
            out.append((f"/run/secrets/{s}", self.secret(s)))
        return sorted(out, key=lambda m: -len(m[0]))

    def secret(self, s):
        path = os.path.join(self.scratch, "secrets", s)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").write(os.urandom(24).hex())
        return path

    def rewritten_copy(self, name, path):
        text = open(path).read()
        # Paths inside a mounted configuration file (a secret, a volume)
        # point where the service's mounts put them.
        for dst, host in self.mounts_without_configs(name):
            text = repath(text, dst, host)
        copy = os.path.join(self.scratch, "conf", name, os.path.basename(path))
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        open(copy, "w").write(text)
        return copy

    def mounts_without_configs(self, name):
        svc = self.spec["services"][name]
        out = []
        for v in svc.get("volumes", []):
            src, dst = v.split(":")[:2]
            if not src.startswith("."):
                host = os.path.join(self.scratch, "volumes", src)
                os.makedirs(host, exist_ok=True)
                out.append((dst, host))
        for s in svc.get("secrets", []):
            out.append((f"/run/secrets/{s}", self.secret(s)))
        return sorted(out, key=lambda m: -len(m[0]))

    def argv(self, name):
        svc = self.spec["services"][name]
        mounts = self.mounts(name)

        def rw(arg):
            for dst, host in mounts:
                arg = repath(arg, dst, host)
            return arg

        entry = svc.get("entrypoint", ["mqlb"])
        command = [rw(a) for a in svc.get("command", [])]
        if entry == ["mqlb"]:
            return [self.mqlb] + command
        # A shell entrypoint: `mqlb` on its PATH is the binary under test.
        return [rw(a) for a in entry] + command

    def start(self, name):
        log = open(os.path.join(self.scratch, f"{name}.log"), "w")
        env = dict(os.environ, PATH=f"{os.path.dirname(self.mqlb)}:{os.environ['PATH']}")
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[name]] + self.argv(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.scratch,
        )

    def log(self, name):
        return open(os.path.join(self.scratch, f"{name}.log")).read()[-3000:]

    def wait_tcp(self, name, port, within=30):
        end = time.time() + within
        while time.time() < end:
            r = self.hub_exec(
                "python3", "-c",
                f"import socket; socket.create_connection(('{self.ip[name]}', {port}), 1)",
                check=False,
            )
            if r.returncode == 0:
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.3)
        raise SystemExit(f"{name} does not listen on {port}:\n{self.log(name)}")

    def admin_get(self, name, port, path, token, published=False, via=None):
        # A published port (127.0.0.1:9100 on the host) is reached as
        # loopback, as a user's browser does; otherwise by service name, as
        # the balancers reach the nodes.
        host = "127.0.0.1" if published else (via or name)
        code = (
            "import urllib.request,sys;"
            f"r=urllib.request.Request('http://{host}:{port}{path}',"
            f"headers={{'Authorization':'Bearer {token}'}});"
            "sys.stdout.write(urllib.request.urlopen(r,timeout=3).read().decode())"
        )
        ns = self.ns[name] if published else self.hub
        r = sh("ip", "netns", "exec", ns, "python3", "-c", code, check=False)
        return r.stdout if r.returncode == 0 else None


def rehearse_statefulset(mqlb, rendered):
    """Runs the rendered StatefulSet's init and start commands for each
    ordinal, as its pods would: HOSTNAME is the pod's name, the Service's
    DNS names map to the pods' addresses, the ConfigMap and Secrets are
    files. Checks that the peers the start command derives form one
    cluster, every node ready, with the same members."""
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    cm_name = next(v["configMap"]["name"] for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    service = sts["spec"]["serviceName"]
    name = sts["metadata"]["name"]
    n = sts["spec"]["replicas"]
    pods = [f"{name}-{i}" for i in range(n)]
    t = Topology(mqlb, names=pods, aliases={p: [f"{p}.{service}"] for p in pods})
    try:
        t.up()
        token = os.urandom(24).hex()
        ca = os.path.join(t.scratch, "ca")
        sh(t.mqlb, "cert", "create-ca", "--out", ca)
        env_of = lambda c: {e["name"]: e["value"] for e in c.get("env", [])}
        spec = sts["spec"]["template"]["spec"]
        for pod in pods:
            root = os.path.join(t.scratch, pod)
            paths = {
                "/etc/mqlb/admin-token/token": os.path.join(root, "token"),
                "/etc/mqlb": os.path.join(root, "config"),
                "/var/lib/mqlb": os.path.join(root, "state"),
                "/tls": os.path.join(root, "tls"),
                "/ca": ca,
            }
            for d in ("config", "state", "tls"):
                os.makedirs(os.path.join(root, d), exist_ok=True)
            open(paths["/etc/mqlb/admin-token/token"], "w").write(token)

            def rw(text):
                for dst in sorted(paths, key=len, reverse=True):
                    text = repath(text, dst, paths[dst])
                return text

            for key, text in cm["data"].items():
                open(os.path.join(root, "config", key), "w").write(rw(text))
            for c in spec.get("initContainers", []) + spec["containers"]:
                env = dict(os.environ, HOSTNAME=pod, **env_of(c))
                env["PATH"] = f"{os.path.dirname(t.mqlb)}:{env['PATH']}"
                argv = ["ip", "netns", "exec", t.ns[pod]] + [rw(a) for a in c["command"]]
                log = open(os.path.join(t.scratch, f"{pod}.log"), "a")
                proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
                if c in spec.get("initContainers", []):
                    if proc.wait(timeout=60) != 0:
                        raise SystemExit(f"{pod}: init container {c['name']} failed:\n{t.log(pod)}")
                else:
                    t.procs[pod] = proc
        end = time.time() + 60
        while True:
            # By the Service DNS names, as the balancers call them.
            views = [t.admin_get(p, 9101, "/cluster", token, via=f"{p}.{service}") for p in pods]
            ready = [t.admin_get(p, 9101, "/readyz", token, via=f"{p}.{service}") is not None for p in pods]
            members = {p: sorted(json.loads(v)["members"]) if v else None for p, v in zip(pods, views)}
            if all(ready) and all(m == sorted(pods) for m in members.values()):
                break
            if time.time() > end:
                raise SystemExit(
                    f"the StatefulSet's nodes did not form one cluster: {members}\n"
                    + "\n".join(t.log(p) for p in pods)
                )
            time.sleep(0.5)
        print(f"  ok {n} pods of {name}: names, peers and certificates derived from the ordinal form one cluster ({', '.join(pods)})")
    finally:
        t.down()
        shutil.rmtree(t.scratch, ignore_errors=True)


def main():
    mqlb = sys.argv[1]
    compose = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "compose.yaml")
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("mosquitto_sub"):
        print("  skipped: needs root, ip and mosquitto-clients")
        return
    if len(sys.argv) > 3 and sys.argv[2] == "statefulset":
        rehearse_statefulset(mqlb, sys.argv[3])
        return
    t = Topology(mqlb, compose)
    try:
        t.up()
        one_shot = [n for n in t.names if "certs" in n]
        brokers = [n for n in t.names if n.startswith("broker")]
        balancers = [n for n in t.names if n.startswith("mqlb")]
        for n in one_shot:
            t.start(n)
            if t.procs[n].wait(timeout=60) != 0:
                raise SystemExit(f"{n} failed:\n{t.log(n)}")
            print(f"  ok {n} ran")
        for n in brokers + balancers:
            t.start(n)
        for n in brokers + balancers:
            t.wait_tcp(n, 1883)
        print(f"  ok {len(brokers)} nodes and {len(balancers)} balancers listen")
        token = open(t.secret("admin_token")).read().strip()
        # The cluster forms: every node ready, and their views agree.
        end = time.time() + 60
        while True:
            views = [t.admin_get(b, 9101, "/cluster", token) for b in brokers]
            ready = [t.admin_get(b, 9101, "/readyz", token) is not None for b in brokers]
            if all(ready) and all(views):
                break
            if time.time() > end:
                raise SystemExit("the cluster did not form:\n" + "\n".join(t.log(b) for b in brokers))
            time.sleep(0.5)
        print("  ok the cluster formed (every node ready)")
        # Each balancer follows the cluster's view through the nodes' admin
        # APIs (cluster_admin, the token, the allowed host names fit).
        for lb in balancers:
            end = time.time() + 30
            while True:
                got = t.admin_get(lb, 9100, "/backends", token, published=True)
                rows = json.loads(got) if got else []
                rows = rows if isinstance(rows, list) else rows.get("backends", [])
                if rows and all(
                    r.get("in_cluster_view") is True and r.get("state") == "up" for r in rows
                ):
                    break
                if time.time() > end:
                    raise SystemExit(f"{lb} does not follow the cluster's view: {got}")
                time.sleep(0.5)
        print(f"  ok {', '.join(balancers)} see every node up and follow the cluster's view")
        a, b = (t.ip[balancers[0]], t.ip[balancers[-1]])

        def sub(count, within):
            return subprocess.Popen(
                ["ip", "netns", "exec", t.hub, "mosquitto_sub", "-h", a, "-p", "1883",
                 "-i", "rehearsal-sub", "-c", "-q", "1", "-t", "rehearsal/#",
                 "-C", str(count), "-W", str(within)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )

        def pub(msg):
            r = subprocess.run(
                ["ip", "netns", "exec", t.hub, "mosquitto_pub", "-h", b, "-p", "1883",
                 "-i", "rehearsal-pub", "-q", "1", "-t", "rehearsal/x", "-m", msg],
                capture_output=True, text=True, timeout=20,
            )
            if r.returncode != 0:
                raise SystemExit(f"publish through {balancers[-1]} failed: {r.stderr}")

        # Across nodes: subscribed through one balancer, published through
        # the other (the publisher's node is not the subscriber's, mostly).
        s = sub(1, 20)
        time.sleep(1.0)
        pub("one")
        out, err = s.communicate(timeout=30)
        if out.strip() != "one":
            raise SystemExit(f"the subscriber got {out!r} ({err})\n" + t.log(balancers[0]))
        print(f"  ok a message published through {balancers[-1]} reached a subscriber on {balancers[0]}")
        # Through a node kill: the node holding the persistent session dies;
        # what is published meanwhile reaches the subscriber when it is back.
        # The balancer names the node that owns it (backends are named after
        # the node IDs).
        info = t.admin_get(balancers[0], 9100, "/clients/rehearsal-sub", token, published=True)
        owner = json.loads(info).get("placed_on") if info else None
        by_id = {f"n{i + 1}": n for i, n in enumerate(brokers)}
        if owner not in by_id:
            raise SystemExit(f"{balancers[0]} does not say where rehearsal-sub is: {info!r}")
        holder = by_id[owner]
        t.procs[holder].send_signal(signal.SIGKILL)
        t.procs[holder].wait()
        time.sleep(0.5)
        pub("two")
        s = sub(1, 30)
        out, err = s.communicate(timeout=40)
        if out.strip() != "two":
            raise SystemExit(f"after killing {holder}, the subscriber got {out!r} ({err})")
        print(f"  ok after kill -9 of {holder} (its session's holder), the message published meanwhile arrived")
    finally:
        t.down()
        shutil.rmtree(t.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
