"""Model nodes: one pure model core per node kind, all driven by one shared runner."""
