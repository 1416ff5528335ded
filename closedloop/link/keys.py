"""CURVE key pairs for the rig link and the allow-list of peers.

A keys folder holds, as ZeroMQ certificate files (``zmq.auth`` format):

- ``control.key`` / ``control.key_secret``: the control PC's pair;
- ``rig.key`` / ``rig.key_secret``: the rig agent's pair (the agent reads ``rig.key_secret``,
  which holds the public key too, and ``allowed/``: copy those to the rig; ``rig.key`` stays with
  the control side, which trusts it);
- ``allowed/``: public keys the rig accepts from control processes (``control.key`` is put
  there); a control process whose key is not in it is refused during the handshake.

The control side trusts exactly the rig whose public key is ``rig.key``: a rig without the
matching secret key cannot complete the handshake. Secret key files are written with mode 0600.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from closedloop.core.files import write_text
from closedloop.core.validation import check_dir, check_file, check_option

__all__ = [
    "KeyPair",
    "ALLOWED_DIR",
    "SIDES",
    "make_keys",
    "make_key_pair",
    "load_key_pair",
    "load_public_key",
    "load_curve_keys",
    "make_authenticator",
]

ALLOWED_DIR = "allowed"
SIDES = ("control", "rig")


class KeyPair(tuple):
    """(public, secret) CURVE keys, each 40 bytes of Z85 text."""

    @property
    def public(self) -> bytes:
        return self[0]

    @property
    def secret(self) -> bytes:
        return self[1]



def _certificate(public: bytes, secret: bytes | None) -> str:
    lines = [
        f"#   closedloop CURVE certificate, written {datetime.now(UTC).isoformat(timespec='seconds')}",
        "#   " + ("SECRET: never copy this file off the machine it belongs to" if secret else "public key"),
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def make_key_pair(folder: str | Path, name: str, *, overwrite: bool = False) -> KeyPair:
    """Write a new CURVE pair as ``folder/name.key`` (0644) and ``folder/name.key_secret`` (0600).

    Refuses to replace existing files unless ``overwrite``.
    """
    folder = check_dir("folder", folder)
    public_path, secret_path = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not overwrite and (public_path.exists() or secret_path.exists()):
        raise FileExistsError(
            f"'{name}': key files already exist in {str(folder)!r}; pass overwrite=True (CLI: --force) "
            "to replace them, then copy the new public key to every peer."
        )
    public, secret = zmq.curve_keypair()
    write_text(secret_path, _certificate(public, secret), mode=0o600)
    write_text(public_path, _certificate(public, None), mode=0o644)
    return KeyPair((public, secret))


def make_keys(folder: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Make the control and rig pairs in ``folder`` and allow the control key on the rig.

    Returns the paths written, by name (``control``, ``rig``, ``allowed``).
    """
    folder = Path(folder).expanduser()
    (folder / ALLOWED_DIR).mkdir(parents=True, exist_ok=True)
    for side in SIDES:
        make_key_pair(folder, side, overwrite=overwrite)
    control = load_public_key(folder / "control.key")
    allowed = folder / ALLOWED_DIR / "control.key"
    write_text(allowed, _certificate(control, None), mode=0o644)
    return {"control": folder / "control.key_secret", "rig": folder / "rig.key_secret", "allowed": allowed.parent}


def _load(path: Path) -> tuple[bytes | None, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"'{path}': not a ZeroMQ CURVE certificate ({error}); make one with `closedloop keys DIR`.") from None


def load_public_key(path: str | Path) -> bytes:
    """The public key (Z85 bytes) in a ``.key`` or ``.key_secret`` file."""
    public, _ = _load(check_file("path", path))
    return public


def load_key_pair(folder: str | Path, side: str) -> KeyPair:
    """The key pair of ``side`` ('control' or 'rig') from ``folder/<side>.key_secret``.

    Refuses a secret key file that others can read (mode must allow the owner only).
    """
    check_option("side", side, SIDES)
    folder = check_dir("keys_dir", folder)
    path = check_file(f"{side} secret key", folder / f"{side}.key_secret")
    if path.stat().st_mode & 0o077:
        raise ValueError(
            f"'{path}': the secret key file is readable by other users (mode {path.stat().st_mode & 0o777:o}); "
            f"run `chmod 600 {path}`."
        )
    public, secret = _load(path)
    if not (public and secret):
        raise ValueError(f"'{path}': needs both public-key and secret-key lines; remake it with `closedloop keys DIR`.")
    return KeyPair((public, secret))


def load_curve_keys(socket, keys_dir: str | Path, side: str) -> None:
    """Set up CURVE on a ZeroMQ ``socket`` from ``keys_dir``, before it binds or connects.

    ``side="rig"``: the socket is the CURVE server with the rig pair (pair it with
    :func:`make_authenticator` for the allow-list). ``side="control"``: the socket is a client with
    the control pair and trusts only the server key in ``rig.key``.
    """
    pair = load_key_pair(keys_dir, side)
    socket.curve_publickey, socket.curve_secretkey = pair.public, pair.secret
    if side == "rig":
        socket.curve_server = True
    else:
        socket.curve_serverkey = load_public_key(Path(keys_dir) / "rig.key")


def make_authenticator(context, keys_dir: str | Path):
    """Start a ZAP authenticator on ``context`` that accepts only the keys in ``keys_dir/allowed/``.

    Returns the started ``zmq.auth.thread.ThreadAuthenticator``; call ``.stop()`` when done.
    """

    allowed = check_dir("allowed keys folder", Path(keys_dir) / ALLOWED_DIR)
    if not any(allowed.glob("*.key")):
        raise ValueError(f"'{allowed}': no allowed public keys (*.key); copy the control PC's control.key there.")
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("closedloop.zap"))
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(allowed))
    return authenticator
