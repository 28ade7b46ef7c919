{{/* The chart name, overridable. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name prefix of every resource: <release>-kubetune unless overridden. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource of the chart. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{/* The operator pods' labels (distinct from the trainer pods', which are
app.kubernetes.io/name=trainer, app.kubernetes.io/managed-by=kubetune). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The trainer pods' labels, set by the operator (operator/kubetune_operator/workload.py). */}}
{{- define "kubetune.trainerSelectorLabels" -}}
app.kubernetes.io/managed-by: kubetune
app.kubernetes.io/name: trainer
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubetune.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) -}}
{{- end -}}

{{- define "kubetune.metricsServiceName" -}}
{{- printf "%s-metrics" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fail early on combinations the schema cannot express clearly. */}}
{{- define "kubetune.validate" -}}
{{- if and (eq .Values.rbac.mode "namespaced") (not .Values.watchNamespaces) -}}
{{- fail "rbac.mode=namespaced needs watchNamespaces: the namespaces to watch, each gets a Role" -}}
{{- end -}}
{{- end -}}

{{/* Namespaces that get the trainer NetworkPolicy, as a list. */}}
{{- define "kubetune.jobNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- toJson $namespaces -}}
{{- end -}}

{{/* "true" when the operator gives each attempt a NetworkPolicy (networkPolicy.perJob). */}}
{{- define "kubetune.perJobNetworkPolicy" -}}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.perJob.enabled -}}true{{- end -}}
{{- end -}}

{{/* "true" when the operator deletes finished jobs' workloads (operator.ttlSecondsAfterFinished). */}}
{{- define "kubetune.cleanup" -}}
{{- if not (kindIs "invalid" .Values.operator.ttlSecondsAfterFinished) -}}true{{- end -}}
{{- end -}}

{{/* The operator's --job-network-policy: how the attempts' NetworkPolicies select the
operator's pods, and the trainers' egress (operator/kubetune_operator/workload.py). */}}
{{- define "kubetune.jobNetworkPolicyJson" -}}
{{- $policy := dict "operatorNamespace" .Release.Namespace "operatorPodLabels" (include "kubetune.selectorLabels" . | fromYaml) -}}
{{- if .Values.networkPolicy.perJob.restrictEgress -}}
{{- $_ := set $policy "egress" (.Values.networkPolicy.perJob.egress | default list) -}}
{{- end -}}
{{- toJson $policy -}}
{{- end -}}

{{/* The RBAC rules: exactly the API calls the operator makes (see
operator/kubetune_operator/kube.py and handlers.py). No Secrets, no wildcards. */}}
{{- define "kubetune.rbacRules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "create"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunesweeps"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunesweeps/status"]
  verbs: ["patch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunepolicies"]
  verbs: ["list", "watch"]
{{- if .Values.rbac.ownerReferencesPermissionEnforcement }}
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/finalizers", "finetunesweeps/finalizers"]
  verbs: ["update"]
{{- end }}
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: {{ if include "kubetune.cleanup" . }}["create", "delete"]{{ else }}["create"]{{ end }}
{{- if include "kubetune.perJobNetworkPolicy" . }}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: {{ if include "kubetune.cleanup" . }}["create", "delete"]{{ else }}["create"]{{ end }}
{{- end }}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
