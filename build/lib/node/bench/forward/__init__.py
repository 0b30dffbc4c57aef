"""`sfumesh bench forward`: the forwarding core's cost beside aiortc's MediaRelay and Janus."""
