"""Bad input files and a vanished rig end the CLI with one `error:` line and exit status 2, never a traceback."""

import socket
from pathlib import Path

import pytest

from closedloop.cli import main

TINY = """
[images]
n_clean_day0 = 4
n_clean_per_day = 2
embedded_per_photo = 1
[model]
backbone = {backbone!r}
[sites]
n_sites = 2
"""


def _main(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in this process; its exit status and what it wrote to stderr."""
    try:
        main(["-q", *argv])
        status = 0
    except SystemExit as done:
        status = done.code
    return status, capsys.readouterr().err


def _check_model(capsys, experiment: Path, backbone: str) -> tuple[int, str]:
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "experiment.toml").write_text(TINY.format(backbone=backbone))
    return _main(capsys, "check-model", "--experiment", str(experiment), "--n-images", "1")


def _one_error_line(status: int, err: str, *, warnings: bool = False) -> str:
    """The one `error:` line; ``warnings``: logged warnings (e.g. reconnect attempts) may come before it."""
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert warnings or len(lines) == 1, err
    return lines[-1]


def test_a_text_file_given_as_pt_checkpoint(tmp_path, capsys):
    (tmp_path / "base.pt").write_text("a text file, not a checkpoint\n")
    line = _one_error_line(*_check_model(capsys, tmp_path, "base.pt"))
    assert "base.pt" in line and "not a PyTorch checkpoint" in line
    assert "trust" not in line  # trusting the file would not help: it is not a checkpoint at all


@pytest.mark.parametrize("sidecar, found", [("[]", "list"), ('"resnet"', "str"), ("{broken", "not valid JSON")])
def test_a_sidecar_that_is_not_a_json_object(tmp_path, capsys, sidecar, found):
    (tmp_path / "base.safetensors").write_bytes(b"\x00" * 16)
    (tmp_path / "base.json").write_text(sidecar)
    line = _one_error_line(*_check_model(capsys, tmp_path, "base.safetensors"))
    assert "base.json" in line and found in line


def test_a_corrupt_safetensors_file(tmp_path, capsys):
    (tmp_path / "base.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "base.json").write_text('{"architecture": "resnet_tiny"}')
    line = _one_error_line(*_check_model(capsys, tmp_path, "base.safetensors"))
    assert "base.safetensors" in line and "not a valid safetensors file" in line


def test_a_backbone_outside_the_experiment_folder(tmp_path, capsys):
    import torch

    from models.networks import make_network

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save(make_network("resnet_tiny", seed=0).state_dict(), checkpoints / "tiny.pt")
    # absolute: allowed
    status, err = _check_model(capsys, tmp_path / "absolute", str(checkpoints / "tiny.pt"))
    assert status == 0, err
    # relative: resolved against the experiment folder
    status, err = _check_model(capsys, tmp_path / "relative", "../checkpoints/tiny.pt")
    assert status == 0, err
    # missing: one line naming the path as given and as resolved
    line = _one_error_line(*_check_model(capsys, tmp_path / "missing", "../checkpoints/gone.pt"))
    assert "'../checkpoints/gone.pt'" in line and str(checkpoints / "gone.pt") in line


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rig_gone_past_reconnect_s(tmp_path, capsys):
    from closedloop.day.runner import run_day

    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    (tmp_path / "experiment.toml").write_text(
        TINY.format(backbone="resnet_tiny")
        + f'[attack]\nbudgets = [2.0]\nsteps = 1\n[rig]\nkind = "zmq"\naddress = "{address}"\nsecurity = "plain"\n'
        "heartbeat_s = 0.05\ntimeout_s = 0.2\nretries = 1\nreconnect_s = 0.3\n"
    )
    run_day(tmp_path, 0, until="bundle")
    line = _one_error_line(*_main(capsys, "fit-day", "0", "--experiment", str(tmp_path)), warnings=True)
    assert f"no answer from the rig at {address} for 0.3 s" in line
