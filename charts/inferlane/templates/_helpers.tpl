{{/*
Helpers shared by every template. All are namespaced "inferlane." so that they cannot clash
with a parent chart's.
*/}}

{{/* The chart name, truncated to a DNS label. */}}
{{- define "inferlane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name of the control plane's objects: RELEASE-inferlane, or RELEASE alone when the
release name already contains the chart name.
*/}}
{{- define "inferlane.fullname" -}}
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

{{/* The namespace of every namespaced object. */}}
{{- define "inferlane.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{/* chart: NAME-VERSION, as the helm.sh/chart label wants it. */}}
{{- define "inferlane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the control-plane pods. Never change them: selectors are immutable. */}}
{{- define "inferlane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferlane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controlplane
{{- end -}}

{{/* Labels of every object. */}}
{{- define "inferlane.labels" -}}
{{ include "inferlane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inferlane
helm.sh/chart: {{ include "inferlane.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The control plane's ServiceAccount. */}}
{{- define "inferlane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "inferlane.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the CA: an existing one, or the one the control plane generates. */}}
{{- define "inferlane.caSecretName" -}}
{{- if .Values.ca.existingSecret -}}
{{- .Values.ca.existingSecret -}}
{{- else -}}
{{- default (printf "%s-ca" (include "inferlane.fullname" .)) .Values.ca.secretName -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap where the replicas keep the workload key epoch, next to the CA Secret
     (mtls/epoch.py: the Secret's name and "-key-epoch"). */}}
{{- define "inferlane.keyEpochName" -}}
{{- printf "%s-key-epoch" (include "inferlane.caSecretName" .) -}}
{{- end -}}

{{/* The settings ConfigMap. */}}
{{- define "inferlane.configName" -}}
{{- printf "%s-config" (include "inferlane.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The control-plane image reference: the digest wins over the tag. */}}
{{- define "inferlane.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/*
Refuse settings that cannot work, saying what to do instead. Included by the Deployment.
*/}}
{{- define "inferlane.checks" -}}
{{- $limits := .Values.globalRateLimit -}}
{{- if and $limits.enabled (gt (int .Values.replicaCount) 1) (not (or $limits.redis.url $limits.redis.existingSecret)) -}}
{{- fail (printf "globalRateLimit.enabled with replicaCount %d needs Redis (globalRateLimit.redis.url or globalRateLimit.redis.existingSecret): counters kept in each replica would each allow the whole limit. Give a Redis, or set replicaCount to 1." (int .Values.replicaCount)) -}}
{{- end -}}
{{- end -}}

{{/* Where sidecars reach the global rate-limit service: by default this chart's Service. */}}
{{- define "inferlane.rlsAddress" -}}
{{- default (printf "%s.%s.svc" (include "inferlane.fullname" .) (include "inferlane.namespace" .)) .Values.globalRateLimit.address -}}
{{- end -}}
