"""The standalone autoscaler: reads each pool's JetStream lag and the replicas' status
(``lego.replicas.<pool>``) and starts or drains node replicas. Planned in issue 3; until then
`lego up` runs one replica per pool and restarts crashed ones."""
