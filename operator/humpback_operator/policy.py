"""The tenancy policy: what a run may ask of the cluster, set by the admin (the chart's `policy`).

Creating a BacktranslationRun creates pods: its images, its service account, the Secrets its pods
read. The policy limits each (docs/security.md):

- `policy.allowedImages`: prefixes of the images a run may name (`spec.resources.*.image`); the
  operator's default images are always allowed. Empty: any image.
- `policy.allowedServiceAccounts`: globs of the service accounts a run may name
  (`spec.podTemplate.serviceAccountName`); the operator's own default is always allowed.
  Empty: a run may name none.
- `policy.secretLabel`: a `key=value` label every Secret a run references must carry (credentials,
  API keys, the Hugging Face token, tracker credentials, env, envFrom, image pull secrets). Empty: any Secret.

Pure: `violations()` takes the labels of the referenced Secrets, read by the caller.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from humpback_runtime.spec import BacktranslationRun

from humpback_operator.config import OperatorConfig


def referenced_secrets(run: BacktranslationRun) -> list[tuple[str, str]]:
    """(field path, Secret name) of every Secret the run's pods would read, in spec order."""
    spec = run.spec
    refs: list[tuple[str, str | None]] = [
        ("spec.storage.s3.credentialsSecret", spec.storage.s3.credentials_secret),
        ("spec.huggingface.tokenSecret", spec.huggingface.token_secret),
        ("spec.publish.hub.tokenSecret", spec.publish.hub.token_secret if spec.publish.hub else None),
        ("spec.curation.rewrite.apiKeySecret", spec.curation.rewrite.api_key_secret),
        ("spec.evaluation.judge.apiKeySecret", spec.evaluation.judge.api_key_secret if spec.evaluation.judge else None),
        ("spec.tracking.mlflow.credentialsSecret", spec.tracking.mlflow.credentials_secret if spec.tracking.mlflow else None),
        ("spec.tracking.wandb.credentialsSecret", spec.tracking.wandb.credentials_secret if spec.tracking.wandb else None),
    ]
    pod = spec.pod_template
    for i, env in enumerate(pod.env):
        if env.value_from and env.value_from.secret_key_ref:
            refs.append((f"spec.podTemplate.env[{i}].valueFrom.secretKeyRef", env.value_from.secret_key_ref.name))
    for i, source in enumerate(pod.env_from):
        if source.secret_ref:
            refs.append((f"spec.podTemplate.envFrom[{i}].secretRef", source.secret_ref.name))
    for i, secret in enumerate(pod.image_pull_secrets):
        refs.append((f"spec.podTemplate.imagePullSecrets[{i}]", secret.name))
    return [(path, name) for path, name in refs if name]


def needs_secret_labels(run: BacktranslationRun, config: OperatorConfig) -> list[str]:
    """Names of the Secrets whose labels the caller must read for `violations`."""
    if not config.secret_label:
        return []
    return list(dict.fromkeys(name for _, name in referenced_secrets(run)))


def violations(run: BacktranslationRun, config: OperatorConfig,
               secret_labels: Mapping[str, Mapping[str, str] | None] | None = None) -> list[str]:
    """Each broken rule as "policy.RULE: field: what is wrong". `secret_labels` maps a Secret name to
    its labels (None: there is no such Secret)."""
    out = []
    if config.allowed_images:
        defaults = (config.runtime_image, config.vllm_image)
        for kind in ("training", "inference", "cpu"):
            image = getattr(run.spec.resources, kind).image
            if image and image not in defaults and not any(image.startswith(p) for p in config.allowed_images):
                out.append(f"policy.allowedImages: spec.resources.{kind}.image {image} does not start with any of "
                           f"{', '.join(config.allowed_images)}")
    account = run.spec.pod_template.service_account_name
    if account and account != config.service_account and not any(
            fnmatch.fnmatchcase(account, p) for p in config.allowed_service_accounts):
        allowed = ", ".join(config.allowed_service_accounts) or "none"
        out.append(f"policy.allowedServiceAccounts: spec.podTemplate.serviceAccountName {account} is not allowed "
                   f"(allowed: {allowed})")
    if config.secret_label:
        key, value = config.secret_label.split("=", 1)
        labels_of = secret_labels or {}
        for path, name in referenced_secrets(run):
            labels = labels_of.get(name)
            if labels is None:
                out.append(f"policy.secretLabel: {path}: Secret {name} does not exist")
            elif labels.get(key) != value:
                out.append(f"policy.secretLabel: {path}: Secret {name} is not labelled {config.secret_label}")
    return out
