{{- define "grok3d.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "grok3d.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "grok3d.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "grok3d.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}

{{- define "grok3d.databaseSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database" (include "grok3d.fullname" .)) -}}
{{- end -}}

{{- define "grok3d.storageSecret" -}}
{{- .Values.storage.existingSecret | default (printf "%s-storage" (include "grok3d.fullname" .)) -}}
{{- end -}}

{{- define "grok3d.xaiSecret" -}}
{{- .Values.xai.existingSecret | default (printf "%s-xai" (include "grok3d.fullname" .)) -}}
{{- end -}}

{{/* The BentoML image's layout: the Bento's sources, and its models laid out as a BentoML home. */}}
{{- define "grok3d.bento" -}}
workingDir: /home/bentoml/bento/src
{{- end -}}

{{- define "grok3d.probes" -}}
startupProbe:
  httpGet: {path: /livez, port: http}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /livez, port: http}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}
