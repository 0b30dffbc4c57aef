"""Media core: forward RTP between peers without decoding or encoding.

`adapter` is the only module that touches aiortc/aioice private attributes; `forward` is a
pure (no I/O) per-subscriber RTP rewriter and fan-out.
"""
