"""A real SSH server for the remote tests: the system's sshd on a free 127.0.0.1 port, with a throwaway host key,
a throwaway user key and its own config in a temporary folder (nothing of the system's SSH setup is read or
changed). `.ci/run` installs openssh-server and rsync when they are missing."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from trainer.remote import Remote

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"  # sshd must be started by its absolute path


def missing() -> str:
    """Why the test cannot run here, or ''."""
    if not Path(SSHD).is_file():
        return "no sshd here: install openssh-server (apt-get install -y openssh-server); .ci/run does"
    for tool in ("ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"no {tool} here: apt-get install -y openssh-client rsync; .ci/run does"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path_factory):
    """A Remote that reaches this machine through its own sshd, as the current user with a key."""
    why = missing()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation folder, which the service would make
    port = _free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "PidFile none", "LogLevel ERROR",
        # One SetEnv line (sshd takes a keyword's first line only): the remote trainer's caches stay in this
        # test's folder, and it computes on as many threads as the local run it is compared with (one under the
        # suite's workers): another thread count sums in another order, and the losses would differ in the last bits.
        " ".join([f"SetEnv XDG_CACHE_HOME={d / 'cache'}",
                  *(f"{name}={os.environ[name]}" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                    if name in os.environ)]),
    ]) + "\n")
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    remote = Remote(host="127.0.0.1", user=getpass.getuser(), port=port, key=str(d / "user_key"),
                    folder=str(d / "remote"), options=[
                        "-F", "/dev/null",  # the machine's own ssh config is not this test's business
                        "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "IdentitiesOnly=yes"])
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(remote.ssh_args() + [remote.target, "true"], capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield remote
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
