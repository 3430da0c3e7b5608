"""The engine: every state transition and rule; no protobuf, no SQL."""
