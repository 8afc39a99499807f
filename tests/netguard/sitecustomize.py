"""Refuse every outbound network connection except to loopback, in this process and (through
PYTHONPATH) in every Python subprocess the tests start, such as papermill's kernel."""

import ipaddress
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _allowed(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: resolving it would already be network access


def _guarded_connect(self, address):
    if not _allowed(address):
        raise ConnectionRefusedError(f"network access refused in tests: {address!r}")
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if not _allowed(address):
        raise ConnectionRefusedError(f"network access refused in tests: {address!r}")
    return _connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
