"""The standalone autoscaler (`lego autoscaler`; `lego up` runs one): reads each pool's
JetStream lag and its replicas' reports, decides replica counts with the pure ``policy``, packs
them onto devices with ``placement`` and has a backend (``backends``: local processes or
Kubernetes Deployments) start or drain replicas. ``service`` is the loop."""
