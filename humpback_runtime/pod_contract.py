"""Names shared by the stages and the operator that starts them: environment variables a pod gets
and where a training stage leaves its model. Standard library only: the operator imports it.
"""

MODEL_DIR = "model"  # a training stage's model: <storage>/<namespace>/<run>/<stage>/model
# Local scratch of a training stage (checkpoints before their upload); default the system temp
# directory. The operator points it at the run's checkpoint volume when it has one.
WORK_DIR_ENV = "HUMPBACK_WORK_DIR"
ENDPOINT_ENV = "HUMPBACK_ENDPOINT"  # the vLLM server's /v1 root for a stage that uses one model
SERVED_MODEL_ENV = "HUMPBACK_SERVED_MODEL"  # the name that server serves the model under
# Stages that use several models (evaluate) get one server per model: a JSON object mapping the
# training stage to its server's /v1 root; each server serves its model under the stage's name.
ENDPOINTS_ENV = "HUMPBACK_ENDPOINTS"
JUDGE_API_KEY_ENV = "HUMPBACK_JUDGE_API_KEY"  # from the Secret evaluation.judge.apiKeySecret
REWRITE_API_KEY_ENV = "HUMPBACK_REWRITE_API_KEY"  # from the Secret curation.rewrite.apiKeySecret
API_KEY_SECRET_KEY = "apiKey"  # the key in those Secrets
# The key a vLLM server started by the operator requires (generated per server, in a Secret owned
# by the run): a client of the server of training stage S gets it as server_api_key_env(S).
SERVER_API_KEY_ENV = "HUMPBACK_SERVER_API_KEY"


def server_api_key_env(train_stage: str) -> str:
    """"train-m0" -> "HUMPBACK_SERVER_API_KEY_M0"."""
    return f"{SERVER_API_KEY_ENV}_{train_stage.removeprefix('train-').upper().replace('-', '_')}"

# A stage pod serves its Prometheus metrics on this port when the operator sets it (the chart's
# metrics.stagePods); the pod declares the port as `metrics` for the PodMonitor.
STAGE_METRICS_PORT_ENV = "HUMPBACK_STAGE_METRICS_PORT"

# Experiment trackers' credentials, read by their own clients from these variables; the keys of
# spec.tracking.mlflow.credentialsSecret (each optional) and spec.tracking.wandb.credentialsSecret.
MLFLOW_CREDENTIAL_ENVS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
WANDB_API_KEY_ENV = "WANDB_API_KEY"

# Kubernetes copies this file into the container's `state.terminated.message` (the default
# terminationMessagePath). A failed stage writes `<error class>: <message>` there, so the operator
# can tell an input found damaged (InputsDamaged: its producer must run again) from other failures,
# also in training pods, where torchrun turns every worker's exit code into 1.
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "HUMPBACK_TERMINATION_LOG"  # another path (tests)
TERMINATION_MESSAGE_BYTES = 4096  # what the kubelet keeps
