"""One sfumesh node: HTTP API, tokens, users, rooms, state."""
