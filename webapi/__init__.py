"""callbridge's HTTP API: a small Flask app (``webapi.app.create_app``) served by the daemon's gevent
WSGI server.

Modules: ``app`` (factory, error handlers, metrics), ``views`` (routes), ``validation`` (request rules),
``envelope`` (the seed's answer shape), ``ratelimit`` (token-guessing brake), ``openapi`` (the contract).
"""
