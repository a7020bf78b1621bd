#!/usr/bin/env bash
# Generate ECDSA (NIST P-384) SuperNode auth key pairs in OpenSSH format.
# flwr 1.42 requires: private key = OpenSSH EC key (--auth-supernode-private-key),
# public key = OpenSSH "ecdsa-sha2-nistp384 ..." line (flwr supernode register).
# ed25519/RSA keys are REJECTED for node auth (ed25519 is only for --trusted-entities).
# Usage: scripts/gen_node_keys.sh [OUT_DIR] [NAME ...]   (default: ./keys node0 node1 node2)
# Each SuperNode keeps its private key NAME; the SuperLink operator registers NAME.pub with
# `flwr supernode register NAME.pub <connection>` before that SuperNode may join.
set -euo pipefail
OUT="${1:-keys}"
shift || true
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=(node0 node1 node2)
mkdir -p "$OUT"
for n in "${NAMES[@]}"; do
  rm -f "$OUT/$n" "$OUT/$n.pub"
  if command -v ssh-keygen >/dev/null 2>&1 && [ -z "${FORCE_PY_KEYGEN:-}" ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedcollm-$n" -f "$OUT/$n"
  else  # fallback: python 'cryptography' (a dependency of flwr)
    python3 - "$OUT/$n" <<'PY'
import os, sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
path = sys.argv[1]
k = ec.generate_private_key(ec.SECP384R1())
with open(path, "wb") as f:
    f.write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
os.chmod(path, 0o600)
with open(path + ".pub", "wb") as f:
    f.write(k.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b"\n")
PY
  fi
done
ls -l "$OUT"
