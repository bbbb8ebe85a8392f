"""The stack's parts, one job each: data, queues, API, edge, workers, monitoring.

Each is a `Section`: a construct that groups resources without entering their CloudFormation logical
ids (see logical_ids.py), so splitting the stack here replaced nothing on a deployed stack. The stack
(infra/acestep_stack.py) builds them in order and hands each the typed resources it needs.
"""

# The sections' construct ids, as the stack names them: the first part of a resource's construct path under the
# stack, and never part of its logical id. Importing this needs no CDK (tests/iam_support.py reads it).
SECTIONS = ("Data", "Queues", "Api", "Edge", "Workers", "Monitoring")
