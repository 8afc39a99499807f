"""Offline always: the test session refuses outbound connections and never asks a hub."""

import os
import socket

import pytest


def test_outbound_connections_are_refused():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(ConnectionRefusedError, match="network access refused"):
            s.connect(("1.1.1.1", 443))
    finally:
        s.close()


def test_hub_offline_flags_are_set():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    import mci_lib.models  # noqa: F401  (the library sets it too)

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
