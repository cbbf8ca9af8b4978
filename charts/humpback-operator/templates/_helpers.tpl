{{/* Chart name, cut to 63 characters. */}}
{{- define "humpback-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: fullnameOverride, else the release name, followed by the chart
name unless the release name already contains it. Cut to 55 characters, so that "-cluster" fits.
*/}}
{{- define "humpback-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 55 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "humpback-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* PodMonitor relabelings: the run and stage pod labels as metric labels. */}}
{{- define "humpback-operator.podMonitorRelabel" -}}
- sourceLabels: [__meta_kubernetes_pod_label_humpback_dev_run]
  targetLabel: run
- sourceLabels: [__meta_kubernetes_pod_label_humpback_dev_stage]
  targetLabel: humpback_stage
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: pod
{{- end }}

{{- define "humpback-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "humpback-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "humpback-operator.labels" -}}
helm.sh/chart: {{ include "humpback-operator.chart" . }}
{{ include "humpback-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: humpback
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "humpback-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "humpback-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "humpback-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "humpback-operator.runtimeImage" -}}
{{- default (printf "ghcr.io/humpback-dev/humpback-runtime:%s" .Chart.AppVersion) .Values.runtime.image }}
{{- end }}

{{- define "humpback-operator.vllmImage" -}}
{{- default (printf "ghcr.io/humpback-dev/humpback-vllm:%s" .Chart.AppVersion) .Values.vllm.image }}
{{- end }}

{{/*
kopf's namespace flags: --all-namespaces, or one --namespace=NAME per watched namespace.
*/}}
{{- define "humpback-operator.watchArgs" -}}
{{- if .Values.watch.allNamespaces }}
- --all-namespaces
{{- else }}
{{- if not .Values.watch.namespaces }}
{{- fail "watch.namespaces must name at least one namespace when watch.allNamespaces is false" }}
{{- end }}
{{- range .Values.watch.namespaces }}
- --namespace={{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
RBAC rules on the runs and their children: a ClusterRole when the operator watches all namespaces,
a Role in each watched namespace otherwise. manifests/rbac/ holds the same rules (a test compares
them). No Secrets: the operator never reads them; pods reference S3 credentials and API keys by
name.
*/}}
{{- define "humpback-operator.rules" -}}
# Kopf watches the runs (list, watch), adds its finalizer and writes its bookkeeping annotations (patch).
- apiGroups: [humpback.dev]
  resources: [backtranslationruns]
  verbs: [get, list, watch, patch]
# The operator writes only the status of a run, never its spec.
- apiGroups: [humpback.dev]
  resources: [backtranslationruns/status]
  verbs: [get, patch]
# Children carry an ownerReference to their run with blockOwnerDeletion, which needs update on the
# run's finalizers where the OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: [humpback.dev]
  resources: [backtranslationruns/finalizers]
  verbs: [update]
# Training stages run as PyTorchJobs, watched to see them complete, deleted on retry, suspend and
# the run's deletion.
- apiGroups: [kubeflow.org]
  resources: [pytorchjobs]
  verbs: [get, list, watch, create, delete]
{{- if .Values.rbac.trainJobs }}
# The alternative training backend, Kubeflow Trainer v2 TrainJobs (rbac.trainJobs).
- apiGroups: [trainer.kubeflow.org]
  resources: [trainjobs]
  verbs: [get, list, watch, create, delete]
{{- end }}
# CPU stages and inference clients run as Jobs, watched to see them complete.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
# vLLM servers: a Deployment and a Service per served model, deleted as soon as their stage ends.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, delete]
# Each vLLM server's generated API key, and its NetworkPolicy (only the stage's clients reach it).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, delete]
# A checkpointVolume's existing claim, mounted by training pods on several nodes: its access modes
# are read to refuse a run whose claim is not ReadWriteMany. Read only.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
{{- if gt (int .Values.replicaCount) 1 }}
# Kopf peering between the replicas, in each watched namespace (created at start-up).
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, create, patch]
{{- end }}
# The run's spec reaches its pods through the ConfigMap <run>-spec, patched when the spec changes.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
# Kopf posts Events about the runs (core and events.k8s.io APIs); patch updates repeated ones.
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Why a stage is not moving: the pods of its children (Unschedulable, ImagePullBackOff, OOMKilled,
# DisruptionTarget) and the Warning Events on them (FailedCreate: quota, PodSecurity). Read only.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [list, watch]
{{- end }}

{{/*
Cluster-scoped reads Kopf needs, in every mode.
*/}}
{{- define "humpback-operator.clusterRules" -}}
# Kopf discovers the resources it serves from their CRDs at startup.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
{{- if .Values.watch.allNamespaces }}
# Watching all namespaces, Kopf follows namespaces as they come and go.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- if gt (int .Values.replicaCount) 1 }}
# Kopf peering between the replicas, cluster-wide (created at start-up).
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, create, patch]
{{- end }}
{{- end }}
{{- end }}
