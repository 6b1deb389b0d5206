"""Locust load tests: ``locustfile.py`` (HTTP, through the gateway) and ``nats_locustfile.py``
(straight to NATS), sharing options and behaviour in ``users.py``. Run from the repository
root (``locust -f loadtest/locustfile.py ...``): the locustfiles import ``loadtest.*``.

Locust puts this directory first on ``sys.path`` while it imports a locustfile, so no module
here may share a name with a project package (hence ``users.py``, not ``common.py``), and
project packages are imported inside functions, after Locust has restored ``sys.path``.
"""
