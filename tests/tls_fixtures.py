"""TLS in front of the embedded broker: certificates made by the test, stunnel4 as the TLS
terminator, and Tansu told to advertise stunnel's port.

    client --TLS--> stunnel (localhost:P) --plain--> Tansu (127.0.0.1:B, advertises localhost:P)

Certificates come from the openssl command line (`cryptography` is not a dependency): a CA,
a second CA nobody trusts, a broker certificate for DNS name `localhost` only (so connecting
to 127.0.0.1 is a hostname mismatch), and a client certificate whose key is encrypted with a
password kept in a file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker, free_port

BROKER_NAME = "localhost"  # the only name in the broker's certificate
KEY_PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path  # a CA that signed nothing the broker presents
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD
    key_password_file: Path


def _openssl(*args: str | Path) -> None:
    out = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, f"openssl {' '.join(map(str, args))}:\n{out.stderr}"


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_EC, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{extensions}\n"
    )
    _openssl("req", *_EC, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    ca = _ca(directory, "test-ca")
    other_ca, _ = _ca(directory, "other-ca")
    server = _leaf(
        directory, "broker", ca, f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{BROKER_NAME}"
    )
    client_cert, plain_key = _leaf(directory, "apm-agent", ca, "extendedKeyUsage=clientAuth")
    password_file = directory / "key-password"
    password_file.write_text(KEY_PASSWORD + "\n")  # a final line break, as editors write it
    client_key = directory / "apm-agent.enc.key"
    _openssl(
        "pkey", "-in", plain_key, "-aes256", "-passout", f"file:{password_file}",
        "-out", client_key,
    )  # fmt: skip
    plain_key.unlink()
    return Pki(ca[0], other_ca, *server, client_cert, client_key, password_file)


class Stunnel:
    """stunnel4 as a child process: TLS on 127.0.0.1:accept_port, plain TCP to the broker."""

    def __init__(
        self, pki: Pki, broker_port: int, directory: Path, *, require_client_cert: bool
    ) -> None:
        self.port = free_port()
        self.log = directory / f"stunnel-{self.port}.log"
        config = directory / f"stunnel-{self.port}.conf"
        lines = [
            "foreground = yes",
            "pid =",
            f"output = {self.log}",
            "[kafka]",
            f"accept = 127.0.0.1:{self.port}",
            f"connect = 127.0.0.1:{broker_port}",
            f"cert = {pki.server_cert}",
            f"key = {pki.server_key}",
        ]
        if require_client_cert:
            lines += [f"CAfile = {pki.ca}", "verifyChain = yes", "requireCert = yes"]
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            ["stunnel4", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            assert self.process.poll() is None, f"stunnel exited:\n{self._log_text()}"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            assert time.monotonic() < deadline, f"stunnel not listening:\n{self._log_text()}"
            time.sleep(0.02)

    def _log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def tls_broker(pki: Pki, directory: Path, *, require_client_cert: bool) -> Iterator[str]:
    """A broker reachable only through stunnel; yields the TLS bootstrap address."""
    broker_port = free_port()
    stunnel = Stunnel(pki, broker_port, directory, require_client_cert=require_client_cert)
    try:
        broker = EmbeddedBroker(
            port=broker_port, advertised_host=BROKER_NAME, advertised_port=stunnel.port
        )
        with broker:
            yield broker.bootstrap_servers
    finally:
        stunnel.stop()
