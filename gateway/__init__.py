"""The way in: the ingress (one validation and planning path for HTTP and NATS requests),
admission control (deadlines, load shedding), the REST gateway on top, and a small client."""
