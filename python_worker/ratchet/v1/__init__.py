"""Generated protocol stubs for ratchet.v1 (see scripts/gen_protos.py). Do not edit."""
