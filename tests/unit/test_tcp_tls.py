"""TLS on dagc's TCP channels (RAY_USE_TLS and Ray's certificate variables). No Ray; loopback.

A module-wide throw-away PKI (tests/tls_certs.py): a CA, a node certificate it signed (what
RAY_TLS_SERVER_CERT/KEY and RAY_TLS_CA_CERT name on every node), and a second CA with a
certificate of its own (a stranger). Checked here: TLS ends talk (and still run the HMAC
handshake inside), a peer whose certificate the CA did not sign is refused on either side, a
plaintext client gets nothing from a TLS writer and is never unpickled, the environment turns
TLS on exactly as Ray reads it; and a set of test_tcp.py's behavioural tests (flow control,
big frames, slow readers, close, wake-ups, killed peers) runs again with TLS on.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import ssl
import struct
import time

import numpy as np
import pytest

from dagc import config
from dagc.runtime.channels.tcp import (
    TcpAuthError,
    TcpReader,
    TcpSetupError,
    TcpWriter,
    TlsFiles,
    new_secret,
)
from dagc.runtime.channels.tcp.wire import HDR, HELLO, KIND_DATA, MAC, NONCE
from tests import tls_certs
from tests.unit import test_tcp as base
from tests.unit.test_tcp import _MakeFile, closing, rng, soon  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        tls_certs.available() is not None,
        reason=f"no TLS test certificates: {tls_certs.available()}",
    ),
]

LOCAL = "127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = tls_certs.make_ca(d, "ca")
    node = tls_certs.make_cert(d, "node", ca)
    other_ca = tls_certs.make_ca(d, "other-ca")
    stranger = tls_certs.make_cert(d, "stranger", other_ca)
    return {
        "good": TlsFiles(node.cert, node.key, ca.cert),
        # a certificate the cluster's CA did not sign, though it trusts that CA itself
        "stranger": TlsFiles(stranger.cert, stranger.key, ca.cert),
        "ca": ca,
    }


@pytest.fixture
def tls_env(pki, monkeypatch):
    """RAY_USE_TLS=1 with the cluster's files, as on a Ray node with TLS."""
    monkeypatch.setenv("RAY_USE_TLS", "1")
    for var, path in zip(config.RAY_TLS_VARS, pki["good"]):
        monkeypatch.setenv(var, path)
    return pki["good"]


def tls_pair(closing, files, nreaders=1, slots=4, reader_files=None, **kw):  # noqa: F811  (test_tcp's fixture)
    secret = new_secret()
    w = TcpWriter("c0", nreaders, slots, secret, tls=files, **kw)
    closing(w)
    host, port = w.listen(LOCAL)
    rs = []
    for i in range(nreaders):
        r = TcpReader(
            host, port, secret, i, channel="c0", connect_timeout=10, tls=reader_files or files
        )
        closing(r)
        rs.append(r)
    return w, rs


# -- it works, over TLS, with the HMAC handshake inside -----------------------------------------
def test_tls_channel_carries_every_kind_of_value(pki, rng, closing):  # noqa: F811  (test_tcp's fixture)
    w, rs = tls_pair(closing, pki["good"], nreaders=2, slots=3)
    values = [base.random_value(rng) for _ in range(150)]
    values += [
        b"x" * (300 << 10),
        np.arange(3 << 20, dtype=np.uint8),  # > a TLS record
        [np.arange(i, dtype=np.int16) for i in range(600)],
    ]  # > IOV_MAX parts
    t = base.Writes(w, values, soon(60))
    t.start()
    for i, v in enumerate(values):
        for r in rs:
            got = r.read(soon(30))
            assert base.same(v, got), f"message {i}"
    t.join(10)
    assert t.error is None and t.done == len(values)
    w.wait_connected(soon())
    for s in [r.sock for r in rs] + [c.sock for c in w._conns]:
        assert isinstance(s, ssl.SSLSocket) and s.version() in ("TLSv1.2", "TLSv1.3")
        assert s.getpeercert(), "the peer must have shown a certificate"


def test_hmac_handshake_still_runs_inside_tls(pki, closing):  # noqa: F811  (test_tcp's fixture)
    w = TcpWriter("c0", 1, 2, new_secret(), tls=pki["good"])
    closing(w)
    host, port = w.listen(LOCAL)
    # the right certificate but the wrong per-compile secret: still rejected
    with pytest.raises(TcpAuthError, match="rejected"):
        TcpReader(host, port, new_secret(), 0, channel="c0", tls=pki["good"])


# -- refusals --------------------------------------------------------------------------------------
def test_reader_with_a_certificate_the_ca_did_not_sign_is_refused(pki, closing):  # noqa: F811  (test_tcp's fixture)
    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret, tls=pki["good"])
    closing(w)
    host, port = w.listen(LOCAL)
    with pytest.raises(TcpSetupError) as ei:
        TcpReader(host, port, secret, 0, channel="c0", tls=pki["stranger"], connect_timeout=3)
    assert "certificate" in str(ei.value) or "could not connect" in str(ei.value), ei.value
    assert w.connected() == 0
    r = TcpReader(host, port, secret, 0, channel="c0", tls=pki["good"])  # reader 0 is free
    closing(r)
    w.write("ok", soon())
    assert r.read(soon()) == "ok"


def test_client_without_any_certificate_gets_nothing(pki, closing):  # noqa: F811  (test_tcp's fixture)
    w = TcpWriter("c0", 1, 2, new_secret(), tls=pki["good"])
    closing(w)
    host, port = w.listen(LOCAL)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=pki["ca"].cert)
    raw = socket.create_connection((host, port), timeout=5)
    got = b""
    try:
        s = ctx.wrap_socket(raw)  # TLS 1.3: the refusal arrives with the first read
        got = s.recv(len(HELLO) + NONCE)
    except (ssl.SSLError, OSError):
        pass
    finally:
        raw.close()
    assert not got.startswith(HELLO), "the writer spoke to a client without a certificate"
    assert w.connected() == 0


def test_writer_with_a_certificate_the_ca_did_not_sign_is_refused(pki, closing):  # noqa: F811  (test_tcp's fixture)
    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret, tls=pki["stranger"])
    closing(w)
    host, port = w.listen(LOCAL)
    t0 = time.monotonic()
    with pytest.raises(TcpAuthError, match="TLS handshake .* failed.*certificate"):
        TcpReader(host, port, secret, 0, channel="c0", tls=pki["good"], connect_timeout=20)
    assert time.monotonic() - t0 < 10, "a refusal, not a retry until connect_timeout"


def test_plaintext_client_to_a_tls_writer_is_refused_unread(pki, tmp_path, closing):  # noqa: F811  (test_tcp's fixture)
    secret = new_secret()
    marker = str(tmp_path / "pwned")
    evil = pickle.dumps(_MakeFile(marker), 5)
    w = TcpWriter("c0", 1, 2, secret, tls=pki["good"])
    closing(w)
    host, port = w.listen(LOCAL)
    # the plain protocol's answer (with a made-up MAC) and a pickle frame, in the clear
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(
        os.urandom(NONCE)
        + struct.pack("<I", 0)
        + os.urandom(MAC)
        + HDR.pack(KIND_DATA, 0, 0, 0, len(evil))
        + evil
    )
    got = b""
    try:
        while True:
            d = s.recv(4096)
            if not d:
                break
            got += d
    except OSError:  # reset: closed with our bytes unread
        pass
    s.close()
    assert HELLO not in got, "a TLS writer spoke plaintext"
    # a plain dagc reader gives up at its connect timeout; nothing was unpickled anywhere
    with pytest.raises(TcpSetupError, match="RAY_USE_TLS"):
        TcpReader(host, port, secret, 0, channel="c0", tls=None, connect_timeout=1.5)
    assert w.connected() == 0
    r = TcpReader(host, port, secret, 0, channel="c0", tls=pki["good"])
    closing(r)
    w.write("ok", soon())
    assert r.read(soon()) == "ok"
    assert not os.path.exists(marker)


def test_tls_reader_to_a_plain_writer_fails_clearly(pki, closing):  # noqa: F811  (test_tcp's fixture)
    secret = new_secret()
    w = TcpWriter("c0", 1, 2, secret, tls=None)
    closing(w)
    host, port = w.listen(LOCAL)
    with pytest.raises(TcpAuthError, match="RAY_USE_TLS set alike"):
        TcpReader(host, port, secret, 0, channel="c0", tls=pki["good"], connect_timeout=5)


# -- the environment, as Ray reads it --------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "TRUE"])
def test_ray_use_tls_turns_tls_on_by_default(value, tls_env, monkeypatch, closing):  # noqa: F811  (test_tcp's fixture)
    monkeypatch.setenv("RAY_USE_TLS", value)
    assert config.ray_tls() == tuple(tls_env)
    w, (r,) = base.pair(closing)  # no tls argument: the environment decides
    w.write({"k": np.arange(5)}, soon())
    assert np.array_equal(r.read(soon())["k"], np.arange(5))
    assert w.tls == tls_env and r.tls == tls_env
    assert isinstance(r.sock, ssl.SSLSocket) and isinstance(w._conns[0].sock, ssl.SSLSocket)


@pytest.mark.parametrize("value", [None, "0", "false", "yes"])
def test_without_ray_use_tls_channels_stay_plain(value, pki, monkeypatch, closing):  # noqa: F811  (test_tcp's fixture)
    if value is None:
        monkeypatch.delenv("RAY_USE_TLS", raising=False)
    else:
        monkeypatch.setenv("RAY_USE_TLS", value)
    for var, path in zip(config.RAY_TLS_VARS, pki["good"]):
        monkeypatch.setenv(var, path)
    assert config.ray_tls() is None
    w, (r,) = base.pair(closing)
    w.write(1, soon())
    assert r.read(soon()) == 1
    assert type(r.sock) is socket.socket and w.tls is None


def test_ray_use_tls_without_its_files_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RAY_USE_TLS", "1")
    for var in config.RAY_TLS_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="RAY_TLS_SERVER_CERT"):
        TcpWriter("c0", 1, 2, new_secret())
    monkeypatch.setenv("RAY_TLS_SERVER_CERT", "/nonexistent/cert.pem")
    monkeypatch.setenv("RAY_TLS_SERVER_KEY", "/nonexistent/key.pem")
    monkeypatch.setenv("RAY_TLS_CA_CERT", "/nonexistent/ca.pem")
    with pytest.raises(TcpSetupError, match="cannot be read"):
        TcpReader(LOCAL, 1, new_secret(), 0, channel="c0", connect=False)


# -- test_tcp.py's behaviour, with TLS on through the environment ------------------------------
@pytest.fixture
def _tls_for_reused(tls_env, monkeypatch):
    """Every end the reused tests make (children included) uses TLS; and it really did."""
    made = []
    for cls in (TcpReader, TcpWriter):

        def spy(self, *a, _real=cls.__init__, **kw):
            made.append(self)
            _real(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", spy)
    yield
    assert made and all(e.tls == tls_env for e in made), "a reused test ran without TLS"


REUSED = [
    "test_out_of_band_arrays_are_aligned_and_owned",
    "test_torch_tensors_go_out_of_band",
    "test_slow_reader_does_not_hold_up_the_others_and_values_are_snapshots",
    "test_unpicklable_value_goes_through_on_encode_error",
    "test_one_writer_three_readers",
    "test_writer_blocks_at_slots_unacked_and_resumes",
    "test_ready_and_wait_ready_do_not_consume",
    "test_writer_first_write_waits_for_readers",
    "test_reader_first_retries_until_writer_listens",
    "test_read_deadline_raises_wait_timeout",
    "test_writer_close_is_channel_closed_after_pending_messages",
    "test_reader_close_is_channel_closed_for_a_waiting_writer",
    "test_close_ends_a_blocked_read_in_another_thread",
    "test_waits_consult_the_waiter_every_slice",
    "test_wake_ends_a_wait_before_its_slice_does",
    "test_killed_reader_process_is_peer_died_for_the_writer",
    "test_killed_writer_process_is_peer_died_for_the_reader",
    "test_reader_killed_mid_frame_is_peer_died_for_the_writer",
    "test_writer_closed_by_a_death_passes_the_name_on",
    "test_busy_reader_outlives_the_liveness_timeout",
]


def _reuse(name):
    """test_tcp.py's test ``name`` as a test of this module (its marks and parameters too),
    run with TLS on; the original is left as it is."""
    fn = getattr(base, name)

    @functools.wraps(fn)
    def test(*args, **kwargs):
        return fn(*args, **kwargs)

    test.__name__ = name.replace("test_", "test_tls_", 1)
    return pytest.mark.usefixtures("_tls_for_reused")(test)


for _name in REUSED:
    globals()[_name.replace("test_", "test_tls_", 1)] = _reuse(_name)
del _name


def test_reused_tests_exist():
    missing = [n for n in REUSED if not hasattr(base, n)]
    assert not missing, f"test_tcp.py no longer has {missing}"
