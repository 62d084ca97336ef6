"""Gloo/NCCL bind to the interface of the worker's Ray node address unless the user chose one."""

import socket
from types import SimpleNamespace

from aigc.cluster import (
    BIND_HOOK,
    SETUP_HOOK_ENV,
    collective_ifname_env,
    interface_for_address,
    worker_runtime_env,
)

IFACES = {
    "lo": [SimpleNamespace(family=socket.AF_INET, address="127.0.0.1")],
    "eth0": [
        SimpleNamespace(family=socket.AF_PACKET, address="02:00:00:00:00:01"),
        SimpleNamespace(family=socket.AF_INET, address="10.77.0.3"),
    ],
}


def test_address_maps_to_its_interface():
    assert interface_for_address("10.77.0.3", IFACES) == "eth0"
    assert interface_for_address("10.77.0.9", IFACES) is None


def test_both_variables_set_for_a_routable_node_address():
    env = collective_ifname_env("10.77.0.3", environ={}, interfaces=IFACES)
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}


def test_user_choice_kept():
    env = collective_ifname_env("10.77.0.3", environ={"GLOO_SOCKET_IFNAME": "ib0"}, interfaces=IFACES)
    assert env == {"NCCL_SOCKET_IFNAME": "eth0"}


def test_loopback_and_unknown_addresses_change_nothing():
    assert collective_ifname_env("127.0.0.1", environ={}, interfaces=IFACES) == {}
    assert collective_ifname_env("10.9.9.9", environ={}, interfaces=IFACES) == {}


def test_worker_runtime_env_installs_the_hook(monkeypatch):
    monkeypatch.delenv(SETUP_HOOK_ENV, raising=False)
    monkeypatch.setenv("AIGC_PROJECT_ROOT", "/x")
    env = worker_runtime_env()["env_vars"]
    assert env[SETUP_HOOK_ENV] == BIND_HOOK
    assert env["AIGC_PROJECT_ROOT"] == "/x"
