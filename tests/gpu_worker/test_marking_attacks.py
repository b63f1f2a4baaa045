"""A flaky operator's C2PA and watermark flags (issue 14): every bad file must stop the worker
at start with one clear line and os.EX_CONFIG (78) -- the exit launch.py does not restart --
never with a traceback (exit 1, restarted in a loop). And odd image sizes never fail a job."""

from __future__ import annotations

import datetime
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from PIL import Image

import gpu_worker.__main__ as worker_main
from gpu_worker.encode import encode_image
from gpu_worker.marking import Marking
from tests.gpu_worker.c2pa_certs import SigningFiles, _name, _usage, _write, make_signing_files

pytestmark = pytest.mark.timeout(120)


class Started(Exception):
    """config_from_args accepted the flags: the worker would start."""


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> None:
    real = worker_main.config_from_args

    def config_then_stop(args):  # type: ignore[no-untyped-def]
        real(args)
        raise Started

    monkeypatch.setattr(worker_main, "config_from_args", config_then_stop)


def run(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int | str, list[str]]:
    """The worker's exit status for ``argv`` (or 'started'), and what it logged."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        try:
            code: int | str = worker_main.main(["--device", "cpu", "--model", "tiny", *argv])
        except Started:
            code = "started"
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def dated_files(folder: Path, *, before: datetime.timedelta,
                after: datetime.timedelta) -> SigningFiles:
    """A C2PA-usable chain whose leaf is valid from now+before to now+after."""
    folder.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=400))
          .not_valid_after(now + datetime.timedelta(days=400))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(_usage(sign=False, ca=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(_name("test signer"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + before).not_valid_after(now + after)
            .issuer_name(ca.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(sign=True, ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False))
    return _write(folder, leaf.sign(ca_key, hashes.SHA256()), ca, key)


def key_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def pkcs8(key) -> bytes:  # type: ignore[no-untyped-def]
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> SigningFiles:
    return make_signing_files(tmp_path_factory.mktemp("good"))


def bad_cases(tmp: Path, good: SigningFiles) -> dict[str, list[str]]:
    cert, key = str(good.cert), str(good.key)
    garbage_pem = tmp / "garbage.pem"
    garbage_pem.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 !!\n"
                            b"-----END CERTIFICATE-----\n")
    binary = tmp / "binary.pem"
    binary.write_bytes(bytes(range(256)) * 8)
    empty = tmp / "empty.pem"
    empty.write_bytes(b"")
    folder = tmp / "a-folder"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    expired = dated_files(tmp / "expired", before=datetime.timedelta(days=-60),
                          after=datetime.timedelta(days=-1))
    future = dated_files(tmp / "future", before=datetime.timedelta(days=10),
                         after=datetime.timedelta(days=60))
    (tmp / "other").mkdir()
    other = make_signing_files(tmp / "other")
    return {
        "missing-cert": ["--c2pa-cert", str(tmp / "nope.pem"), "--c2pa-key", key],
        "missing-key": ["--c2pa-cert", cert, "--c2pa-key", str(tmp / "nope.pem")],
        "cert-without-key": ["--c2pa-cert", cert],
        "key-without-cert": ["--c2pa-key", key],
        "tsa-without-cert": ["--c2pa-tsa-url", "http://127.0.0.1:9/"],
        "garbage-pem-cert": ["--c2pa-cert", str(garbage_pem), "--c2pa-key", key],
        "binary-cert": ["--c2pa-cert", str(binary), "--c2pa-key", key],
        "empty-cert": ["--c2pa-cert", str(empty), "--c2pa-key", key],
        "key-as-cert": ["--c2pa-cert", key, "--c2pa-key", key],
        "directory-cert": ["--c2pa-cert", str(folder), "--c2pa-key", key],
        "directory-key": ["--c2pa-cert", cert, "--c2pa-key", str(folder)],
        "binary-key": ["--c2pa-cert", cert,
                       "--c2pa-key", str(key_file(tmp / "binkey.pem", bytes(range(256)) * 8))],
        "empty-key": ["--c2pa-cert", cert, "--c2pa-key", str(key_file(tmp / "e.pem", b""))],
        "others-read-key": ["--c2pa-cert", cert, "--c2pa-key",
                            str(key_file(tmp / "open.pem", good.key.read_bytes(), 0o644))],
        "mismatched-key": ["--c2pa-cert", cert, "--c2pa-key", str(other.key)],
        "ed25519-key-for-ec-cert": ["--c2pa-cert", cert, "--c2pa-key", str(key_file(
            tmp / "ed.pem", pkcs8(ed25519.Ed25519PrivateKey.generate())))],
        "secp256k1-key": ["--c2pa-cert", cert, "--c2pa-key", str(key_file(
            tmp / "k1.pem", pkcs8(ec.generate_private_key(ec.SECP256K1()))))],
        "expired-cert": ["--c2pa-cert", str(expired.cert), "--c2pa-key", str(expired.key)],
        "not-yet-valid-cert": ["--c2pa-cert", str(future.cert), "--c2pa-key", str(future.key)],
        "tsa-not-a-url": ["--c2pa-cert", cert, "--c2pa-key", key, "--c2pa-tsa-url",
                          "not a url"],
        "tsa-ftp-url": ["--c2pa-cert", cert, "--c2pa-key", key, "--c2pa-tsa-url",
                        "ftp://tsa.example/"],
        "empty-cert-flag": ["--c2pa-cert", "", "--c2pa-key", key],
    }


CASES = ["missing-cert", "missing-key", "cert-without-key", "key-without-cert",
         "tsa-without-cert", "garbage-pem-cert", "binary-cert", "empty-cert", "key-as-cert",
         "directory-cert", "directory-key", "binary-key", "empty-key", "others-read-key",
         "mismatched-key", "ed25519-key-for-ec-cert", "secp256k1-key", "expired-cert",
         "not-yet-valid-cert", "tsa-not-a-url", "tsa-ftp-url", "empty-cert-flag"]


@pytest.mark.parametrize("case", CASES)
def test_bad_c2pa_flags_refuse_with_ex_config_and_one_line(
        case: str, good: SigningFiles, tmp_path: Path, started: None,
        caplog: pytest.LogCaptureFixture) -> None:
    argv = bad_cases(tmp_path, good)[case]
    code, lines = run(argv, caplog)
    assert code == os.EX_CONFIG, (
        f"{case}: the worker {'would start' if code == 'started' else f'exits {code}'} "
        f"instead of refusing with EX_CONFIG (78); logged: {lines}")
    errors = [line for line in lines if line.startswith("cannot start")]
    assert len(errors) == 1 and "\n" not in errors[0], lines
    assert "Traceback" not in errors[0]


def test_good_files_start(good: SigningFiles, started: None,
                          caplog: pytest.LogCaptureFixture) -> None:
    code, lines = run(["--c2pa-cert", str(good.cert), "--c2pa-key", str(good.key),
                       "--watermark"], caplog)
    assert code == "started", lines


def test_an_unreachable_timestamp_authority_does_not_stop_the_start(
        good: SigningFiles, started: None, caplog: pytest.LogCaptureFixture) -> None:
    # A network outage is not a configuration error: a worker restarted during one must
    # come back (signing then goes without the timestamp until the authority answers).
    code, lines = run(["--c2pa-cert", str(good.cert), "--c2pa-key", str(good.key),
                       "--c2pa-tsa-url", "http://127.0.0.1:9/"], caplog)
    assert code == "started", lines


def test_a_key_file_run_as_root_is_still_checked_for_mode(good: SigningFiles, tmp_path: Path,
                                                          started: None,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """Mode 000: unreadable for a normal user (open fails: OSError -> 78); root reads it
    anyway, which is fine (group/other bits are clear)."""
    key = key_file(tmp_path / "k.pem", good.key.read_bytes(), 0o000)
    code, lines = run(["--c2pa-cert", str(good.cert), "--c2pa-key", str(key)], caplog)
    assert code == ("started" if os.geteuid() == 0 else os.EX_CONFIG), lines


# ------------------------------------------------------------------ odd sizes, watermark on

SIZES = [(8, 8), (16, 16), (64, 64), (255, 257), (257, 255), (256, 257), (257, 257),
         (4, 16384), (5, 13109), (7, 9363), (1023, 65), (513, 129), (264, 248), (16384, 4)]


WEBP_MAX_SIDE = 16383  # WebP's own limit, watermark or not
CASES_BY_SIZE = [(width, height, fmt) for width, height in SIZES for fmt in ("png", "jpeg", "webp")
                 if fmt != "webp" or max(width, height) <= WEBP_MAX_SIDE]


@pytest.mark.parametrize(("width", "height", "fmt"), CASES_BY_SIZE)
def test_watermark_never_fails_an_odd_size(width: int, height: int, fmt: str) -> None:
    rng = np.random.default_rng(width * 100_000 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    from tests.gpu_worker.test_marking import metadata
    data = encode_image(image, fmt, metadata=metadata(fmt, width, height),
                        marking=Marking(watermark=True))
    assert Image.open(io.BytesIO(data)).size == (width, height)
