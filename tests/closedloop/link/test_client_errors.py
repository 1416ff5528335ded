"""The rig link fails with a one-line RigLinkError naming the address, and never hangs on close."""

import pytest

from closedloop.link.client import RigClient, RigLinkError


@pytest.mark.timeout(10)  # before the fix, close() waited forever for the socket left open
@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "rig-pc:5555"])
def test_an_address_zeromq_cannot_connect_to(address):
    with pytest.raises(RigLinkError) as error:
        with RigClient(address, security="plain", timeout_s=0.1, heartbeat_s=0.05, reconnect_s=0.2) as client:
            client.connect()
    message = str(error.value)
    assert message.startswith(f"cannot connect to the rig at {address!r}") and "\n" not in message
