"""The Flower engine: the same method objects and round loop as in-process, with clients on other machines.

`server_app.app` and `client_app.app` are the Flower ServerApp and ClientApp (see the README, "Run across
machines"); `records` converts what crosses the wire to and from Flower records.
"""
