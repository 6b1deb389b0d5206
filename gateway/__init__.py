"""The way in: the ingress (one validation and planning path for HTTP and NATS requests), the
REST gateway on top of it, and a small Python client."""
