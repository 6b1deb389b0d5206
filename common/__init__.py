"""What every LegoDiffusion process shares: settings, wire messages, subjects, errors, the tensor
store, workflow specs and model directories."""
