{{/* Names and labels shared by the templates. */}}
{{- define "dicom-node.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dicom-node.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dicom-node.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The environment of every container: secrets from secrets.existingSecret. */}}
{{- define "dicom-node.env" -}}
- name: DICOM_NODE__QUEUE__BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.existingSecret }}
      key: {{ .Values.secrets.brokerUrlKey }}
- name: DICOM_NODE__CATALOG__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.existingSecret }}
      key: {{ .Values.secrets.catalogUrlKey }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}
