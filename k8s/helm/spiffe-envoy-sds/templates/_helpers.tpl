{{/* The chart's name, and the release-qualified name of its objects. */}}
{{- define "sds.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sds.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sds.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sds.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sds.labels" -}}
{{ include "sds.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sds.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end -}}

{{- define "sds.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "sds.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* "true" when the bridge runs per caller (mode daemonset, daemonset.perCaller.enabled). */}}
{{- define "sds.perCaller" -}}
{{- if and (eq .Values.mode "daemonset") .Values.daemonset.perCaller.enabled -}}true{{- end -}}
{{- end -}}

{{/* The agent's admin socket (per caller): the same path in the bridge as on the node. */}}
{{- define "sds.adminSocket" -}}
{{- printf "%s/%s" (.Values.daemonset.perCaller.adminSocketDir | trimSuffix "/") .Values.daemonset.perCaller.adminSocketName -}}
{{- end -}}

{{/* The agent's gid in decimal (per caller), or "" if it is none. A values file's numbers
arrive as floats, which toString would write as 1e+06. */}}
{{- define "sds.agentGroup" -}}
{{- $group := .Values.daemonset.perCaller.agentGroup -}}
{{- if kindIs "float64" $group -}}
{{- if and (ge $group 0.0) (eq $group (floor $group)) -}}{{ int64 $group }}{{- end -}}
{{- else if regexMatch "^[0-9]+$" (toString $group) -}}
{{- toString $group -}}
{{- end -}}
{{- end -}}

{{/* Fail early on values that cannot work. */}}
{{- define "sds.validate" -}}
{{- if not (has .Values.mode (list "sidecar" "daemonset")) -}}
{{- fail (printf "mode: %q: want sidecar or daemonset" .Values.mode) -}}
{{- end -}}
{{- $names := list -}}
{{- range .Values.policies -}}{{- $names = append $names .name -}}{{- end -}}
{{- if eq .Values.mode "sidecar" -}}
{{- if not (has .Values.sidecar.inbound.policy $names) -}}
{{- fail (printf "sidecar.inbound.policy: %q is not in policies" .Values.sidecar.inbound.policy) -}}
{{- end -}}
{{- if and .Values.sidecar.outbound.enabled (not (has .Values.sidecar.outbound.policy $names)) -}}
{{- fail (printf "sidecar.outbound.policy: %q is not in policies" .Values.sidecar.outbound.policy) -}}
{{- end -}}
{{- end -}}
{{- if include "sds.perCaller" . -}}
{{- $dir := .Values.daemonset.perCaller.adminSocketDir | toString -}}
{{- if or (not (hasPrefix "/" $dir)) (eq $dir "/") -}}
{{- fail (printf "daemonset.perCaller.adminSocketDir: %q: want an absolute directory other than /" $dir) -}}
{{- end -}}
{{- $name := .Values.daemonset.perCaller.adminSocketName | toString -}}
{{- if or (not $name) (contains "/" $name) -}}
{{- fail (printf "daemonset.perCaller.adminSocketName: %q: want a file name in adminSocketDir" $name) -}}
{{- end -}}
{{- if not (include "sds.agentGroup" .) -}}
{{- fail (printf "daemonset.perCaller.agentGroup: %q: want the agent's numeric gid" (toString .Values.daemonset.perCaller.agentGroup)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The bridge's `sds run` config (docs/configuration.md). */}}
{{- define "sds.bridgeConfig" -}}
{{- $config := dict
  "listen" "unix:///run/sds/bridge/sds.sock"
  "socket_mode" "0660"
  "admin" "127.0.0.1:8181"
-}}
{{- if .Values.allowedUids }}{{ $_ := set $config "allowed_uids" .Values.allowedUids }}{{ end -}}
{{- if .Values.allowedGids }}{{ $_ := set $config "allowed_gids" .Values.allowedGids }}{{ end -}}
{{- if .Values.policies }}{{ $_ := set $config "policies" .Values.policies }}{{ end -}}
{{- if .Values.metrics.enabled }}{{ $_ := set $config "metrics" (printf "0.0.0.0:%d" (int .Values.metrics.port)) }}{{ end -}}
{{- if include "sds.perCaller" . }}{{ $_ := set $config "per_caller" (dict "delegated_identity_api" (printf "unix://%s" (include "sds.adminSocket" .))) }}{{ end -}}
{{- toYaml (merge (deepCopy .Values.extraConfig) $config) -}}
{{- end -}}

{{/* The bridge container (both modes). */}}
{{- define "sds.bridgeContainer" -}}
- name: sds-bridge
  image: {{ include "sds.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "--config", "/etc/sds/sds.yaml"]
  {{- if not (include "sds.perCaller" .) }}
  env:
    # The Workload API (the config names none, like SPIRE's own examples).
    - name: SPIFFE_ENDPOINT_SOCKET
      value: {{ printf "unix://%s" .Values.upstream.socket | quote }}
  {{- end }}
  {{- if .Values.metrics.enabled }}
  ports:
    - name: sds-metrics
      containerPort: {{ .Values.metrics.port }}
  {{- end }}
  securityContext:
    runAsUser: {{ .Values.bridge.uid }}
    runAsGroup: {{ .Values.envoy.gid }}
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
  startupProbe:
    exec:
      command: ["sds", "wait", "--socket", "unix:///run/sds/bridge/sds.sock", "--timeout", "1"]
    periodSeconds: 2
    timeoutSeconds: 3
    failureThreshold: 90
  {{- if .Values.metrics.enabled }}
  readinessProbe:
    httpGet: {path: /readyz, port: sds-metrics}
    periodSeconds: 10
  livenessProbe:
    httpGet: {path: /healthz, port: sds-metrics}
    periodSeconds: 20
    failureThreshold: 3
  {{- else }}
  readinessProbe:
    exec:
      command: ["sds", "wait", "--admin", "127.0.0.1:8181", "--timeout", "1"]
    periodSeconds: 10
    timeoutSeconds: 3
  livenessProbe:
    exec:
      command:
        - python
        - -c
        - "import urllib.request as u; u.urlopen('http://127.0.0.1:8181/healthz', timeout=2)"
    periodSeconds: 20
    timeoutSeconds: 3
    failureThreshold: 3
  {{- end }}
  volumeMounts:
    {{- if include "sds.perCaller" . }}
    # per_caller.delegated_identity_api in sds.yaml; no Workload API in this
    # mode.
    - name: spire-agent-admin
      mountPath: {{ dir (include "sds.adminSocket" .) }}
      readOnly: true
    {{- else }}
    - name: spiffe-workload-api
      mountPath: {{ dir .Values.upstream.socket }}
      readOnly: true
    {{- end }}
    - name: sds-socket
      mountPath: /run/sds
    - name: sds-config
      mountPath: /etc/sds
      readOnly: true
  resources:
    {{- toYaml .Values.bridge.resources | nindent 4 }}
{{- end -}}

{{/* The upstream volume. Per caller: the agent's admin socket directory on the node (a
directory of its own, not the Workload API's, which the CSI driver hands to every pod);
only the bridge mounts it. Otherwise the Workload API: the SPIFFE CSI driver, or a
read-only hostPath. */}}
{{- define "sds.upstreamVolume" -}}
{{- if include "sds.perCaller" . -}}
- name: spire-agent-admin
  hostPath:
    path: {{ dir (include "sds.adminSocket" .) }}
    type: Directory
{{- else -}}
- name: spiffe-workload-api
  {{- if .Values.upstream.csi.enabled }}
  csi:
    driver: {{ .Values.upstream.csi.driver }}
    readOnly: true
  {{- else }}
  hostPath:
    path: {{ .Values.upstream.hostPath }}
    type: Directory
  {{- end }}
{{- end }}
{{- end -}}

{{- define "sds.podScheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
