#!/usr/bin/env bash
# Generate a self-signed CA and a SuperLink TLS certificate signed by it.
# Usage: SAN="DNS:server.example.org,IP:10.1.2.3" scripts/gen_certs.sh [OUT_DIR]   (default OUT_DIR: ./certs)
# SAN adds the names/addresses SuperNodes use to reach the SuperLink; localhost is always included (the operator's
# `flwr` CLI reaches the full API on 127.0.0.1 of the server).
# Give ca.crt to every SuperNode and to the machine running `flwr run`; server.key never leaves the SuperLink.
# Produces: ca.crt ca.key server.crt server.key (PEM). Idempotent: overwrites.
set -euo pipefail
OUT="${1:-certs}"
mkdir -p "$OUT"
cd "$OUT"

# 1) CA (self-signed, CA:TRUE)
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 365 \
  -keyout ca.key -out ca.crt -subj "/CN=fedcollm-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# 2) Server key + CSR
openssl req -newkey rsa:2048 -nodes -sha256 \
  -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null

# 3) Server cert signed by the CA, with SANs (hostname verification uses SANs)
cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1${SAN:+,$SAN}
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out server.crt -days 365 -sha256 -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key

openssl verify -CAfile ca.crt server.crt
echo "certs written to $OUT"
