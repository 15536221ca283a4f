{{/* Names and labels. */}}
{{- define "envoy-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "envoy-sidecar.fullname" -}}
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

{{- define "envoy-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "envoy-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "envoy-sidecar.labels" -}}
{{ include "envoy-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod labels: the chart's labels win over standalone.podLabels (the selector must keep matching). */}}
{{- define "envoy-sidecar.podLabels" -}}
{{- $labels := include "envoy-sidecar.labels" . | fromYaml -}}
{{- toYaml (merge $labels (deepCopy .Values.standalone.podLabels)) -}}
{{- end -}}

{{- define "envoy-sidecar.serviceAccountName" -}}
{{- $sa := .Values.standalone.serviceAccount -}}
{{- if $sa.create -}}
{{- default (include "envoy-sidecar.fullname" .) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{- define "envoy-sidecar.annotations" -}}
{{- with .Values.commonAnnotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "envoy-sidecar.image" -}}
{{- $tag := .image.tag | default .appVersion -}}
{{- if .image.digest -}}
{{- printf "%s/%s@%s" .image.registry .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s/%s:%s" .image.registry .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "envoy-sidecar.sidecarImage" -}}
{{- include "envoy-sidecar.image" (dict "image" .Values.image "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* Where the pod-side objects (ConfigMaps, metrics Service) live. */}}
{{- define "envoy-sidecar.podNamespace" -}}
{{- if eq .Values.mode "envoyGateway" -}}{{ .Values.envoyGateway.proxyNamespace }}{{- else -}}{{ .Release.Namespace }}{{- end -}}
{{- end -}}

{{/*
The socket paths: the single source of truth for the sidecar's --listen, the Backend's unix endpoints
and the standalone bootstrap's pipe endpoints. One per worker (NAME-i.sock when workers > 1, as
`sidecar serve --workers` names them). Returned as a JSON list.
*/}}
{{- define "envoy-sidecar.socketPaths" -}}
{{- $dir := trimSuffix "/" .Values.socket.dir -}}
{{- $name := .Values.socket.name -}}
{{- $paths := list -}}
{{- if eq (int .Values.sidecar.workers) 1 -}}
{{- $paths = append $paths (printf "%s/%s" $dir $name) -}}
{{- else -}}
{{- $ext := ext $name -}}
{{- $stem := trimSuffix $ext $name -}}
{{- range $i := until (int .Values.sidecar.workers) -}}
{{- $paths = append $paths (printf "%s/%s-%d%s" $dir $stem $i $ext) -}}
{{- end -}}
{{- end -}}
{{- range $paths -}}
{{- if gt (len .) 107 -}}
{{- fail (printf "socket path %q is %d characters; a Unix socket path must be at most 107 (108 with the terminating NUL): shorten socket.dir or socket.name" . (len .)) -}}
{{- end -}}
{{- end -}}
{{- toJson $paths -}}
{{- end -}}

{{- define "envoy-sidecar.listen" -}}
unix:{{ trimSuffix "/" .Values.socket.dir }}/{{ .Values.socket.name }}
{{- end -}}

{{/* The sidecar config file: plugin chains only; listen/workers/etc. are command-line flags. */}}
{{- define "envoy-sidecar.sidecarConfig" -}}
{{- $chains := dict -}}
{{- if .Values.sidecar.plugins -}}
{{- $_ := set $chains "default" (dict "on_error" .Values.sidecar.onError "plugins" .Values.sidecar.plugins) -}}
{{- end -}}
{{- range $name, $chain := .Values.sidecar.chains -}}
{{- $_ := set $chains $name $chain -}}
{{- end -}}
{{- if not $chains -}}
{{- fail "sidecar.plugins (or sidecar.chains) must name at least one plugin" -}}
{{- end -}}
log_format: {{ .Values.sidecar.logFormat }}
access_log: {{ .Values.sidecar.accessLog }}
tracing: {{ .Values.sidecar.tracing.enabled }}
chains:
  {{- toYaml $chains | nindent 2 }}
{{- end -}}

{{- define "envoy-sidecar.securityContext" -}}
{{- $ctx := deepCopy .Values.containerSecurityContext -}}
{{- $_ := set $ctx "runAsUser" (int .Values.security.runAsUser) -}}
{{- $_ := set $ctx "runAsGroup" (int .Values.security.runAsGroup) -}}
{{- toYaml $ctx -}}
{{- end -}}

{{/* A gRPC health check over the Unix socket(s) the sidecar serves (kubelet's grpc probe speaks TCP only). */}}
{{- define "envoy-sidecar.healthExec" -}}
exec:
  command:
    - python
    - -c
    - "import sys; from sidecar.stack.sidecar import health_status as h; sys.exit(any(h(p, sys.argv[1], 2.0) != 'SERVING' for p in sys.argv[2:]))"
    - {{ .service | quote }}
    {{- range (include "envoy-sidecar.socketPaths" .root | fromJsonArray) }}
    - {{ . | quote }}
    {{- end }}
{{- end -}}

{{/* The ext_proc sidecar container. */}}
{{- define "envoy-sidecar.sidecarContainer" -}}
{{- $v := .Values.sidecar -}}
name: envoy-sidecar
image: {{ include "envoy-sidecar.sidecarImage" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if $v.nativeSidecar }}
restartPolicy: Always
{{- end }}
args:
  - serve
  # Extra arguments first: argparse keeps a flag's last value, so none of them can override what the chart
  # sets below (the socket, its mode, the start checks against Envoy's config).
  {{- range $v.extraArgs }}
  - {{ . | quote }}
  {{- end }}
  - --config
  - /etc/envoy-sidecar/config/sidecar.yaml
  - --listen
  - {{ include "envoy-sidecar.listen" . }}
  - --socket-mode
  - {{ .Values.socket.mode | quote }}
  - --workers
  - {{ $v.workers | quote }}
  - --grace-period
  - {{ $v.gracePeriod | quote }}
  - --log-format
  - {{ $v.logFormat }}
  - --log-level
  - {{ $v.logLevel }}
  # What Envoy was told to send (the same values the ext_proc filter is rendered from): the sidecar
  # refuses to start, with the reason in one log line, when its plugins need more.
  - --envoy-processing-mode
  - {{ include "envoy-sidecar.envoyProcessingMode" . }}
  # ... and the namespaces and attributes it was given: a plugin declaring one more refuses to start.
  # FLAG=VALUE, one argument: a list starting with "-" stays a value.
  - {{ printf "--envoy-receiving-namespaces=%s" (include "envoy-sidecar.receivingNamespaces" . | fromJsonArray | join ",") | toJson }}
  - {{ printf "--envoy-forwarding-namespaces=%s" (.Values.extProc.metadata.accessibleNamespaces | join ",") | toJson }}
  - {{ printf "--envoy-request-attributes=%s" (.Values.extProc.processingMode.request.attributes | join ",") | toJson }}
  - {{ printf "--envoy-response-attributes=%s" (.Values.extProc.processingMode.response.attributes | join ",") | toJson }}
  {{- if $v.metrics.enabled }}
  - --metrics
  - 0.0.0.0:{{ $v.metrics.port }}
  {{- end }}
env:
  {{- if .Values.pluginFiles }}
  - name: PYTHONPATH
    value: /etc/envoy-sidecar/plugins:/opt/sidecar-plugins  # the ConfigMap, then a derived image's plugins
  {{- end }}
  - name: PYTHONDONTWRITEBYTECODE
    value: "1"
  {{- if $v.tracing.enabled }}
  {{- with $v.tracing.otlpEndpoint }}
  - name: OTEL_EXPORTER_OTLP_ENDPOINT
    value: {{ . | quote }}
  {{- end }}
  - name: OTEL_SERVICE_NAME
    value: {{ $v.tracing.serviceName | quote }}
  {{- end }}
  {{- with $v.extraEnvVars }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if $v.metrics.enabled }}
ports:
  - name: sidecar-metrics
    containerPort: {{ $v.metrics.port }}
    protocol: TCP
{{- end }}
{{- if $v.startupProbe.enabled }}
startupProbe:
  {{- include "envoy-sidecar.healthExec" (dict "root" . "service" "") | nindent 2 }}
  periodSeconds: {{ $v.startupProbe.periodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ $v.startupProbe.failureThreshold }}
{{- end }}
{{- if $v.livenessProbe.enabled }}
livenessProbe:
  {{- include "envoy-sidecar.healthExec" (dict "root" . "service" "") | nindent 2 }}
  periodSeconds: {{ $v.livenessProbe.periodSeconds }}
  timeoutSeconds: {{ $v.livenessProbe.timeoutSeconds }}
  failureThreshold: {{ $v.livenessProbe.failureThreshold }}
{{- end }}
{{- if $v.readinessProbe.enabled }}
readinessProbe:
  {{- include "envoy-sidecar.healthExec" (dict "root" . "service" "envoy.service.ext_proc.v3.ExternalProcessor") | nindent 2 }}
  periodSeconds: {{ $v.readinessProbe.periodSeconds }}
  timeoutSeconds: {{ $v.readinessProbe.timeoutSeconds }}
  failureThreshold: {{ $v.readinessProbe.failureThreshold }}
{{- end }}
{{- if not $v.nativeSidecar }}
lifecycle:
  preStop:
    # exec, not the `sleep` action: this fallback is for clusters too old for native sidecars.
    exec:
      command: ["sleep", {{ $v.preStopSeconds | quote }}]
{{- end }}
resources:
  {{- toYaml $v.resources | nindent 2 }}
securityContext:
  {{- include "envoy-sidecar.securityContext" . | nindent 2 }}
volumeMounts:
  - name: {{ .Values.socket.volumeName }}
    mountPath: {{ .Values.socket.dir }}
  - name: envoy-sidecar-config
    mountPath: /etc/envoy-sidecar/config
    readOnly: true
  {{- if .Values.pluginFiles }}
  - name: envoy-sidecar-plugins
    mountPath: /etc/envoy-sidecar/plugins
    readOnly: true
  {{- end }}
  - name: envoy-sidecar-tmp
    mountPath: /tmp
  {{- with $v.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Modules pulled by the init container (delivery: local). Returned as a JSON list. */}}
{{- define "envoy-sidecar.localWasm" -}}
{{- $out := list -}}
{{- range .Values.wasm.modules -}}
{{- if ne (default "local" .delivery) "envoyGateway" -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "envoy-sidecar.wasmFile" -}}
{{ trimSuffix "/" .root.Values.wasm.dir }}/{{ .module.name }}.wasm
{{- end -}}

{{/*
The Wasm init containers, one per locally delivered module, run in order before the sidecar and Envoy.
Contract with the fetcher (docs/deploy.md): `sidecar wasm pull REF --sha256 <image manifest digest>
[--pull-secret FILE] --cache-dir DIR --output FILE` verifies and writes the module to FILE.
Returned as a YAML list.
*/}}
{{- define "envoy-sidecar.wasmInitContainers" -}}
{{- $root := . -}}
{{- range $m := include "envoy-sidecar.localWasm" . | fromJsonArray }}
- name: wasm-pull-{{ $m.name }}
  image: {{ include "envoy-sidecar.sidecarImage" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args:
    - wasm
    - pull
    - {{ $m.image | quote }}
    - --sha256
    - {{ $m.sha256 | quote }}
    {{- if $m.pullSecret }}
    - --pull-secret
    - {{ $root.Values.wasm.pullSecretsDir }}/{{ $m.pullSecret }}/.dockerconfigjson
    {{- end }}
    - --cache-dir
    - {{ trimSuffix "/" $root.Values.wasm.dir }}/.cache
    - --output
    - {{ include "envoy-sidecar.wasmFile" (dict "root" $root "module" $m) }}
  resources:
    {{- toYaml $root.Values.wasm.resources | nindent 4 }}
  securityContext:
    {{- include "envoy-sidecar.securityContext" $root | nindent 4 }}
  volumeMounts:
    - name: {{ $root.Values.wasm.volumeName }}
      mountPath: {{ $root.Values.wasm.dir }}
    - name: envoy-sidecar-tmp
      mountPath: /tmp
    {{- if $m.pullSecret }}
    - name: pull-secret-{{ $m.name }}
      mountPath: {{ $root.Values.wasm.pullSecretsDir }}/{{ $m.pullSecret }}
      readOnly: true
    {{- end }}
{{- end }}
{{- end -}}

{{/* Pod volumes shared by both modes. */}}
{{- define "envoy-sidecar.volumes" -}}
{{- $root := . -}}
- name: {{ .Values.socket.volumeName }}
  emptyDir:
    {{- with .Values.socket.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.socket.sizeLimit }}
- name: envoy-sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
- name: envoy-sidecar-config
  configMap:
    name: {{ include "envoy-sidecar.fullname" . }}-config
{{- if .Values.pluginFiles }}
- name: envoy-sidecar-plugins
  configMap:
    name: {{ include "envoy-sidecar.fullname" . }}-plugins
{{- end }}
{{- $modules := include "envoy-sidecar.localWasm" . | fromJsonArray }}
{{- if $modules }}
- name: {{ .Values.wasm.volumeName }}
  emptyDir:
    sizeLimit: {{ .Values.wasm.sizeLimit }}
{{- range $m := $modules }}
{{- if $m.pullSecret }}
- name: pull-secret-{{ $m.name }}
  secret:
    secretName: {{ $m.pullSecret }}
    defaultMode: 0440
    items:
      - key: .dockerconfigjson
        path: .dockerconfigjson
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Envoy's mounts: the socket directory, and the Wasm directory read-only. */}}
{{- define "envoy-sidecar.envoyMounts" -}}
- name: {{ .Values.socket.volumeName }}
  mountPath: {{ .Values.socket.dir }}
{{- if (include "envoy-sidecar.localWasm" . | fromJsonArray) }}
- name: {{ .Values.wasm.volumeName }}
  mountPath: {{ .Values.wasm.dir }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Envoy's Wasm HTTP filter for a locally pulled module (same shape in both modes). */}}
{{- define "envoy-sidecar.wasmFilter" -}}
name: envoy.filters.http.wasm/envoy-sidecar/{{ .module.name }}
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
  config:
    name: {{ .module.name }}
    root_id: {{ default "" .module.rootID | quote }}
    configuration:
      "@type": type.googleapis.com/google.protobuf.StringValue
      value: {{ default dict .module.config | toJson | quote }}
    fail_open: {{ default false .module.failOpen }}
    vm_config:
      vm_id: {{ .module.name }}
      runtime: envoy.wasm.runtime.v8
      code:
        local:
          filename: {{ include "envoy-sidecar.wasmFile" . }}
{{- end -}}

{{/* extProc.processingMode as Envoy's processing_mode fields, for `sidecar serve --envoy-processing-mode`.
Trailers are sent only with FULL_DUPLEX_STREAMED bodies, as the standalone bootstrap and EG configure them. */}}
{{- define "envoy-sidecar.envoyProcessingMode" -}}
{{- $pm := .Values.extProc.processingMode -}}
{{- $out := list -}}
{{- range $side := list "request" "response" -}}
{{- $block := get $pm $side -}}
{{- $body := include "envoy-sidecar.bodyMode" $block.body -}}
{{- $out = append $out (printf "%s_header_mode=%s" $side (ternary "SEND" "SKIP" $block.enabled)) -}}
{{- $out = append $out (printf "%s_body_mode=%s" $side $body) -}}
{{- $out = append $out (printf "%s_trailer_mode=%s" $side (ternary "SEND" "SKIP" (eq $body "FULL_DUPLEX_STREAMED"))) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* The namespaces Envoy accepts dynamic metadata from the sidecar in, as a JSON list: the sidecar's own
first, then extProc.metadata.writableNamespaces (as `sidecar envoy-config` writes receiving_namespaces). */}}
{{- define "envoy-sidecar.receivingNamespaces" -}}
{{- prepend (without .Values.extProc.metadata.writableNamespaces "envoy-sidecar") "envoy-sidecar" | toJson -}}
{{- end -}}

{{/* The declarations' values: attributes ride on the headers message, and EG's own limits, said here in one
line rather than by the API server or a silent drop. */}}
{{- define "envoy-sidecar.validateDeclarations" -}}
{{- range $side := list "request" "response" -}}
{{- $block := get $.Values.extProc.processingMode $side -}}
{{- if and $block.attributes (not $block.enabled) -}}
{{- fail (printf "extProc.processingMode.%s.attributes: Envoy sends attributes with the %s headers, which extProc.processingMode.%s.enabled: false skips; enable it or drop the attributes" $side $side $side) -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.mode "envoyGateway" -}}
{{- $writable := include "envoy-sidecar.receivingNamespaces" . | fromJsonArray -}}
{{- if gt (len $writable) 8 -}}
{{- fail (printf "extProc.metadata.writableNamespaces: Envoy Gateway allows at most 8 writable namespaces, envoy-sidecar included; got %d" (len $writable)) -}}
{{- end -}}
{{- range $writable -}}
{{- if hasPrefix "envoy.filters.http" . -}}
{{- fail (printf "extProc.metadata.writableNamespaces: %q: Envoy Gateway refuses an Envoy HTTP filter's namespace (envoy.filters.http...) as writable" .) -}}
{{- end -}}
{{- end -}}
{{- range $side := list "request" "response" -}}
{{- range (get $.Values.extProc.processingMode $side).attributes -}}
{{- if not (regexMatch `^(connection\.|source\.|destination\.|request\.|response\.|upstream\.|xds\.route_)[a-z_1-9]*$` .) -}}
{{- fail (printf "extProc.processingMode.%s.attributes: %q: Envoy Gateway accepts only connection., source., destination., request., response., upstream. and xds.route_ attributes (lower case)" $side .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "envoy-sidecar.bodyMode" -}}
{{- $m := dict "" "NONE" "Streamed" "STREAMED" "Buffered" "BUFFERED" "BufferedPartial" "BUFFERED_PARTIAL" "FullDuplexStreamed" "FULL_DUPLEX_STREAMED" -}}
{{- if not (hasKey $m .) -}}
{{- fail (printf "unknown body mode %q: expected one of Streamed, Buffered, BufferedPartial, FullDuplexStreamed or empty" .) -}}
{{- end -}}
{{- get $m . -}}
{{- end -}}

{{/* Checks every mode shares. */}}
{{- define "envoy-sidecar.validate" -}}
{{- $_ := include "envoy-sidecar.socketPaths" . -}}
{{- $_ := include "envoy-sidecar.sidecarConfig" . -}}
{{- $_ := include "envoy-sidecar.bodyMode" .Values.extProc.processingMode.request.body -}}
{{- $_ := include "envoy-sidecar.bodyMode" .Values.extProc.processingMode.response.body -}}
{{- $_ := include "envoy-sidecar.validateDeclarations" . -}}
{{- if hasPrefix (printf "%s/" (trimSuffix "/" .Values.socket.dir)) (printf "%s/" (trimSuffix "/" .Values.wasm.dir)) -}}
{{- if (include "envoy-sidecar.localWasm" . | fromJsonArray) -}}
{{- fail "wasm.dir must not be inside socket.dir: they are separate volumes" -}}
{{- end -}}
{{- end -}}
{{- $kube := .Capabilities.KubeVersion.Version -}}
{{- if and .Values.sidecar.nativeSidecar (semverCompare "<1.29.0-0" $kube) -}}
{{- fail (printf "sidecar.nativeSidecar: native sidecars need Kubernetes >= 1.29 (this cluster: %s); set sidecar.nativeSidecar=false" $kube) -}}
{{- end -}}
{{- if and (eq .Values.mode "standalone") .Values.standalone.envoy.preStopSeconds (semverCompare "<1.30.0-0" $kube) -}}
{{- fail (printf "standalone.envoy.preStopSeconds: the preStop sleep action needs Kubernetes >= 1.30 (this cluster: %s); set it to 0" $kube) -}}
{{- end -}}
{{- if eq .Values.mode "envoyGateway" -}}
{{- if not .Values.envoyGateway.gateway.name -}}
{{- fail "envoyGateway.gateway.name: the Gateway whose Envoy pods get the sidecar is required in envoyGateway mode" -}}
{{- end -}}
{{- if not .Values.envoyGateway.targets -}}
{{- fail "envoyGateway.targets: at least one target (a Gateway or HTTPRoute to route through the sidecar) is required in envoyGateway mode" -}}
{{- end -}}
{{- if .Values.inProcess.enabled -}}
{{- fail "inProcess.enabled: only with mode: standalone (the Envoy that Envoy Gateway runs has no Python to load the plugins into); use the sidecar there" -}}
{{- end -}}
{{- else if not .Values.standalone.upstream.host -}}
{{- fail "standalone.upstream.host: the backend Envoy forwards to is required in standalone mode" -}}
{{- end -}}
{{- end -}}
