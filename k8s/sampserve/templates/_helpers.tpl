{{- define "sampserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sampserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sampserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sampserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sampserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sampserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sampserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sampserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sampserve.claimName" -}}
{{- default (printf "%s-models" (include "sampserve.fullname" .)) .Values.modelRepository.pvc.existingClaim -}}
{{- end -}}

{{/* Where the Secrets are mounted in the server container (their paths go into the ConfigMap). */}}
{{- define "sampserve.apiKeyFile" -}}/etc/sampserve/api-key/api-key{{- end -}}
{{- define "sampserve.tlsDir" -}}/etc/sampserve/tls{{- end -}}
{{- define "sampserve.clientCAFile" -}}/etc/sampserve/client-ca/ca.crt{{- end -}}
{{- define "sampserve.probeTLSDir" -}}/etc/sampserve/probe-tls{{- end -}}

{{- define "sampserve.tls" -}}
{{- if .Values.server.tls.existingSecret }}true{{ end -}}
{{- end -}}

{{- define "sampserve.mtls" -}}
{{- $ca := .Values.server.tls.clientCA -}}
{{- if and .Values.server.tls.existingSecret (or $ca.existingSecret $ca.existingConfigMap) }}true{{ end -}}
{{- end -}}

{{- define "sampserve.metricsPort" -}}
{{- if kindIs "invalid" .Values.server.metricsPort }}{{ .Values.server.httpPort }}{{ else }}{{ .Values.server.metricsPort }}{{ end -}}
{{- end -}}

{{- define "sampserve.metricsPortName" -}}
{{- if kindIs "invalid" .Values.server.metricsPort }}http{{ else }}metrics{{ end -}}
{{- end -}}

{{/*
The probe client under mutual TLS: GET a path on the REST port over TLS with the probe's client
certificate, from inside the container. Like the kubelet's HTTPS probes it does not verify the server
(it is the same pod, on loopback). Exit 0 on 2xx/3xx, as an httpGet probe succeeds.
argv: port, path, timeout (s), certificate file, key file.
*/}}
{{- define "sampserve.probeScript" -}}
import http.client, ssl, sys
port, path, timeout, cert, key = sys.argv[1:]
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
tls.check_hostname = False
tls.verify_mode = ssl.CERT_NONE
try:
    tls.load_cert_chain(cert, key)
    conn = http.client.HTTPSConnection("127.0.0.1", int(port), timeout=float(timeout), context=tls)
    conn.request("GET", path)
    status = conn.getresponse().status
except Exception as exc:
    sys.exit(f"{path}: {exc!r}")
sys.exit(0 if 200 <= status < 400 else f"{path}: {status}")
{{- end -}}

{{/*
One probe's handler and timings. dict: ctx (the root context), path, probe (its values).
Plaintext: httpGet. TLS: httpGet with scheme HTTPS (the kubelet skips verification). Mutual TLS:
exec of sampserve.probeScript with a client certificate (the kubelet's HTTPS probes present none).
*/}}
{{- define "sampserve.probe" -}}
{{- $ctx := .ctx -}}
{{- if include "sampserve.mtls" $ctx }}
{{- $dir := ternary (include "sampserve.probeTLSDir" $ctx) (include "sampserve.tlsDir" $ctx) (ne $ctx.Values.server.tls.clientCA.probeSecret "") }}
exec:
  command:
    - python
    - -c
    - {{ include "sampserve.probeScript" $ctx | toJson }}
    - {{ $ctx.Values.server.httpPort | quote }}
    - {{ .path }}
    - {{ sub .probe.timeoutSeconds 1 | max 1 | quote }}
    - {{ printf "%s/tls.crt" $dir }}
    - {{ printf "%s/tls.key" $dir }}
{{- else }}
httpGet:
  path: {{ .path }}
  port: http
  scheme: {{ ternary "HTTPS" "HTTP" (eq (include "sampserve.tls" $ctx) "true") }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end -}}

{{/* Combinations the schema cannot express; Helm stops with the message. */}}
{{- define "sampserve.validate" -}}
{{- $s := .Values.server -}}
{{- if eq (int $s.httpPort) (int $s.grpcPort) }}
{{- fail "server.httpPort and server.grpcPort must differ" }}
{{- end }}
{{- if not (kindIs "invalid" $s.metricsPort) }}
{{- if or (eq (int $s.metricsPort) (int $s.httpPort)) (eq (int $s.metricsPort) (int $s.grpcPort)) }}
{{- fail "server.metricsPort must differ from server.httpPort and server.grpcPort (null: /metrics on httpPort)" }}
{{- end }}
{{- end }}
{{- $ca := $s.tls.clientCA }}
{{- if and $ca.existingSecret $ca.existingConfigMap }}
{{- fail "server.tls.clientCA: give existingSecret or existingConfigMap, not both" }}
{{- end }}
{{- if and (or $ca.existingSecret $ca.existingConfigMap $ca.probeSecret) (not $s.tls.existingSecret) }}
{{- fail "server.tls.clientCA (mutual TLS) needs server.tls.existingSecret (the server's certificate)" }}
{{- end }}
{{- if and $ca.probeSecret (not (or $ca.existingSecret $ca.existingConfigMap)) }}
{{- fail "server.tls.clientCA.probeSecret is only used under mutual TLS: set clientCA.existingSecret or existingConfigMap" }}
{{- end }}
{{- end -}}

{{- define "sampserve.secretMode" -}}
{{- if hasKey (.Values.podSecurityContext | default dict) "fsGroup" }}0440{{ else }}0444{{ end -}}
{{- end -}}
