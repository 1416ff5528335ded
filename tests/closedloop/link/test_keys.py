"""CURVE keys: files, permissions, refusals, and the `closedloop keys` command."""

from __future__ import annotations

import json
import os

import pytest
import zmq

from closedloop.cli import main
from closedloop.link.keys import load_key_pair, load_public_key, make_authenticator, make_key_pair, make_keys


def test_make_keys_writes_pairs_and_the_allow_list(tmp_path):
    written = make_keys(tmp_path / "k")
    assert set(written) == {"control", "rig", "allowed"}
    for side in ("control", "rig"):
        pair = load_key_pair(tmp_path / "k", side)
        assert len(pair.public) == 40 and len(pair.secret) == 40
        assert zmq.curve_public(pair.secret) == pair.public
        assert (tmp_path / "k" / f"{side}.key_secret").stat().st_mode & 0o777 == 0o600
    assert load_public_key(tmp_path / "k" / "allowed" / "control.key") == load_key_pair(tmp_path / "k", "control").public
    assert not list((tmp_path / "k").glob(".*")), "temporary files were left behind"


def test_key_refusals(tmp_path):
    make_key_pair(tmp_path, "rig")
    with pytest.raises(FileExistsError, match="'rig': key files already exist"):
        make_key_pair(tmp_path, "rig")
    os.chmod(tmp_path / "rig.key_secret", 0o644)
    with pytest.raises(ValueError, match="readable by other users .mode 644.; run `chmod 600"):
        load_key_pair(tmp_path, "rig")
    with pytest.raises(ValueError, match="Invalid value for 'side'"):
        load_key_pair(tmp_path, "monkey")
    with pytest.raises(FileNotFoundError, match="'control secret key'"):
        load_key_pair(tmp_path, "control")
    (tmp_path / "junk.key").write_text("hello")
    with pytest.raises(ValueError, match="not a ZeroMQ CURVE certificate"):
        load_public_key(tmp_path / "junk.key")
    (tmp_path / "rig.key_secret").write_text((tmp_path / "rig.key").read_text())
    os.chmod(tmp_path / "rig.key_secret", 0o600)
    with pytest.raises(ValueError, match="needs both public-key and secret-key lines"):
        load_key_pair(tmp_path, "rig")
    (tmp_path / "allowed").mkdir()
    context = zmq.Context()
    with pytest.raises(ValueError, match="no allowed public keys"):
        make_authenticator(context, tmp_path)
    context.term()


def test_keys_command(tmp_path, capsys):
    main(["keys", str(tmp_path / "k"), "--json"])
    assert json.loads(capsys.readouterr().out)["rig"].endswith("rig.key_secret")
    with pytest.raises(SystemExit) as done:
        main(["keys", str(tmp_path / "k")])
    assert done.value.code == 2
    assert "already exist" in capsys.readouterr().err
