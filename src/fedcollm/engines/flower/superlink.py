"""Flower's SuperLink with only its Fleet API on the address clients reach.

`flower-superlink` 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run/ls/stop`, `flwr supernode
register`) and the Runtime API (ServerApp, SuperExec) on one HTTP(S) port; its `--control-api-address` is
deprecated and ignored for HTTP, and Control API authentication (OIDC) exists only in Flower's enterprise
distribution. On the README's public port any holder of `ca.crt`, i.e. every client, could therefore register extra
SuperNodes (Sybils that defeat every per-client bound), start, stop and list runs, and claim ServerApp tasks.

    python -m fedcollm.engines.flower.superlink --fleet-address 0.0.0.0:9092 [flower-superlink options]

runs the same SuperLink (Flower's own app, every `flower-superlink` option) with its full API on `--host:--port`
(keep it on 127.0.0.1, Flower's default, for the operator's `flwr` CLI and the SuperExec) and a second listener at
`--fleet-address` that answers only Fleet API paths, with the same TLS certificate.
"""

from __future__ import annotations

import socket
import sys

FLEET_PREFIX = "/v1/fleet/"


class FleetOnly:
    """ASGI wrapper: a request that arrives on `public_port` reaches only the Fleet API; anything else is 404."""

    def __init__(self, app, public_port: int):
        self.app, self.public_port = app, public_port

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and (scope.get("server") or (None, None))[1] == self.public_port
                and not scope["path"].startswith(FLEET_PREFIX)):
            from starlette.responses import PlainTextResponse

            refused = PlainTextResponse("only the Fleet API is served on this address", status_code=404)
            return await refused(scope, receive, send)
        return await self.app(scope, receive, send)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _pop_fleet_address(argv: list[str]) -> tuple[str, int]:
    for i, arg in enumerate(argv):
        if arg == "--fleet-address" and i + 1 < len(argv) or arg.startswith("--fleet-address="):
            value = argv.pop(i + 1) if arg == "--fleet-address" else arg.split("=", 1)[1]
            argv.pop(i)
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit():
                raise SystemExit(f"--fleet-address: expected HOST:PORT, got {value!r}")
            return host.strip("[]"), int(port)
    raise SystemExit("--fleet-address HOST:PORT is required (the address SuperNodes connect to)")


def main() -> None:
    import importlib

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package exports its function

    fleet_host, fleet_port = _pop_fleet_address(sys.argv)
    config = flower._parse_superlink_lifespan_config()  # every flower-superlink option, parsed by Flower
    if fleet_port == config.port:
        raise SystemExit(f"--fleet-address: port {fleet_port} is also --port (the full API); give it its own port")
    app = FleetOnly(create_app(config, flower.SuperLinkLifespan), fleet_port)
    sockets = [_listen(config.host, config.port), _listen(fleet_host, fleet_port)]
    print(f"SuperLink: full API on {config.host}:{config.port}, Fleet API only on {fleet_host}:{fleet_port}",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
                                  log_config=get_uvicorn_log_config(console_handler.level), access_log=True,
                                  workers=1)).run(sockets=sockets)


if __name__ == "__main__":
    main()
