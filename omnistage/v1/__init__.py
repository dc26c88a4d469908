"""Generated from protos/omnistage/v1 by scripts/gen_protos.py. Do not edit."""
