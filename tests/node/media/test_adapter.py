"""The aiortc adapter: start-up check, ICE host addresses, configuration."""

from __future__ import annotations

import aioice
import aioice.ice
import pytest
from aiortc import RTCRtpReceiver, RTCRtpSender

from node.media import adapter


def test_check_aiortc_passes_on_pinned_version():
    assert adapter.missing_private_api() == []
    adapter.check_aiortc()


def test_check_aiortc_names_missing_method(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(RTCRtpReceiver, "_send_rtcp_pli")
    with pytest.raises(RuntimeError) as info:
        adapter.check_aiortc()
    message = str(info.value)
    assert "RTCRtpReceiver._send_rtcp_pli" in message
    assert "aiortc==1.16.0" in message


def test_check_aiortc_names_missing_instance_attribute(monkeypatch: pytest.MonkeyPatch):
    def init_without_history(self, trackOrKind, transport):
        self._ssrc = 1

    monkeypatch.setattr(RTCRtpSender, "__init__", init_without_history)
    with pytest.raises(RuntimeError, match=r"RTCRtpSender\._RTCRtpSender__rtp_history"):
        adapter.check_aiortc()


def test_check_aiortc_notices_aioice_change(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(aioice.ice, "get_host_addresses")
    with pytest.raises(RuntimeError, match="get_host_addresses"):
        adapter.check_aiortc()


def test_rtc_configuration_has_no_ice_servers_by_default():
    assert adapter.rtc_configuration().iceServers == []


async def test_host_addresses_include_loopback():
    adapter.set_host_addresses(["127.0.0.1", "::1"])
    try:
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=False, use_ipv6=True) == ["::1"]
        connection = aioice.Connection(ice_controlling=True, use_ipv6=False)
        try:
            await connection.gather_candidates()
            hosts = [(c.type, c.host) for c in connection.local_candidates]
        finally:
            await connection.close()
        assert hosts == [("host", "127.0.0.1")]
    finally:
        adapter.set_host_addresses(None)
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)


def test_host_addresses_are_validated():
    with pytest.raises(ValueError):
        adapter.set_host_addresses(["not-an-address"])
