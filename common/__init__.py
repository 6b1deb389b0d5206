"""What every LegoDiffusion process shares: settings, wire messages, subjects, errors, the tensor
store, workflow specs and their registry, model directories, request tracking and the view of
the cluster (pool lag and replica reports)."""
