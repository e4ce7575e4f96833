"""Ray cluster configs (cluster/aws.yaml for `ray up`, cluster/kuberay/ for KubeRay) and their tooling:
`cluster.validate` checks them offline, `cluster.capacity` tells Ray how far a cluster can grow,
`cluster.mlflow_server` runs the head's MLflow server."""

# The custom resource of trial-driver slots. The clusters here advertise it on their on-demand nodes only (the head
# and the CPU node type); orchestrator.runner gives each trial's driver one slot wherever a cluster offers them, so
# a spot GPU node's preemption never takes a driver down (Train resumes its workers from the last checkpoint), and
# the slots bound how many drivers a node hosts.
TRIAL_DRIVER_RESOURCE = "satscale_trial_driver"
