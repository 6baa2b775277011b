{{/* Names and labels shared by the chart's objects. */}}

{{- define "weir.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "weir.controller" -}}
{{- printf "%s-controller" (include "weir.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "weir.serviceAccountName" -}}
{{- default (include "weir.controller" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "weir.labels" -}}
{{ include "weir.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weir
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "weir.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "weir.runtimeImage" -}}
{{- default (printf "ghcr.io/weir-dev/weir:%s" .Chart.AppVersion) .Values.runtimeImage -}}
{{- end -}}

{{/* Leader election: on when more than one replica runs. */}}
{{- define "weir.leaderElect" -}}
{{- if gt (int .Values.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{/*
The rules the controller needs in a namespace whose StreamJobs it runs: each verb is one the
controller's code uses (see docs/operations.md, "Security").
*/}}
{{- define "weir.jobRules" -}}
# StreamJobs: watched; finalizers patched (the final savepoint on deletion); status written.
- apiGroups: ["weir.dev"]
  resources: ["streamjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["weir.dev"]
  resources: ["streamjobs/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion on the job's objects (needed where the
# OwnerReferencesPermissionEnforcement admission plugin is on).
- apiGroups: ["weir.dev"]
  resources: ["streamjobs/finalizers"]
  verbs: ["update"]
# StreamSnapshots: recorded for every savepoint; listed and deleted by retention.
- apiGroups: ["weir.dev"]
  resources: ["streamsnapshots"]
  verbs: ["get", "list", "create", "delete"]
- apiGroups: ["weir.dev"]
  resources: ["streamsnapshots/status"]
  verbs: ["patch"]
# A job's objects: watched as metadata, applied server-side (create on first apply), deleted
# on suspend (and its pods first, before a deleted job's checkpoints go: onCancel: delete).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Secrets: the job's API token Secret (created once, read to call the coordinator), its job
# secret Secret (created when missing; looked up, its value never used) and the S3
# credentials a job names (read for retention's and onCancel's deletes). Never listed,
# watched, patched, updated or deleted.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# A job's NetworkPolicy: watched as metadata, applied server-side, deleted when the job turns
# it off or is suspended.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Events on StreamJobs.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
