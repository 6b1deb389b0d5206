"""What every LegoDiffusion process shares: settings, wire messages, subjects, errors, the tensor
store, workflow specs and their registry, model directories, request tracking and the view of
the cluster (pool lag and replica reports)."""

import time

#: when this process first imported ``common`` (monotonic): every `lego` command does so among
#: its first imports, so a replica's cold start splits here between the process's own start
#: (exec, the interpreter) and what our code then does (imports, set-up, weights); a process
#: forked from a template (``autoscaler.backends.template``) sets it when it begins
STARTED_AT = time.monotonic()
