{{/*
The standalone Envoy bootstrap: the same structure `sidecar envoy-config` prints (listener -> HCM ->
[local Wasm modules] -> ext_proc -> router -> upstream; the sidecar's socket(s) as pipe endpoints), plus a
`ready` listener for the readiness probe. Snake-case proto JSON, as Envoy reads it.
*/}}
{{- define "envoy-sidecar.bootstrap" -}}
{{- $root := . -}}
{{- $s := .Values.standalone -}}
{{- $pm := .Values.extProc.processingMode -}}
{{- $sockets := include "envoy-sidecar.socketPaths" . | fromJsonArray -}}
{{- $reqBody := include "envoy-sidecar.bodyMode" $pm.request.body -}}
{{- $respBody := include "envoy-sidecar.bodyMode" $pm.response.body -}}
{{- $isIP := regexMatch "^[0-9.]+$|:" $s.upstream.host -}}
static_resources:
  listeners:
    - name: main
      address:
        socket_address: {address: 0.0.0.0, port_value: {{ $s.envoy.port }}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                route_config:
                  name: local
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {prefix: /}
                          route: {cluster: upstream}
                http_filters:
                  {{- range $m := include "envoy-sidecar.localWasm" . | fromJsonArray }}
                  - {{ include "envoy-sidecar.wasmFilter" (dict "root" $root "module" $m) | nindent 20 | trim }}
                  {{- end }}
                  {{- if .Values.inProcess.enabled }}
                  - {{ include "envoy-sidecar.inProcessFilter" . | nindent 20 | trim }}
                  {{- else }}
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: {cluster_name: envoy-sidecar}
                        timeout: 5s
                        # A worker that died or stalled: open the stream again on another one, while the
                        # sidecar has answered nothing yet (the same as `sidecar envoy-config`).
                        retry_policy:
                          retry_on: connect-failure,refused-stream,reset,unavailable
                          num_retries: 2
                          retry_back_off: {base_interval: 0.010s, max_interval: 0.050s}
                          retry_host_predicate:
                            - name: envoy.retry_host_predicates.previous_hosts
                              typed_config:
                                "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                          host_selection_retry_max_attempts: 3
                      # The default chain's failure policy, for timeouts and an unreachable sidecar too.
                      failure_mode_allow: {{ include "envoy-sidecar.failOpen" . }}
                      message_timeout: {{ include "envoy-sidecar.protoDuration" .Values.extProc.messageTimeout }}
                      # The longest a plugin may ask for per message (override_message_timeout), as envoy-config.
                      {{- $seconds := include "envoy-sidecar.protoDuration" .Values.extProc.messageTimeout | trimSuffix "s" | float64 }}
                      max_message_timeout: {{ ternary (include "envoy-sidecar.protoDuration" .Values.extProc.messageTimeout) "10s" (gt $seconds 10.0) }}
                      allow_mode_override: {{ .Values.extProc.allowModeOverride }}
                      processing_mode:
                        request_header_mode: {{ ternary "SEND" "SKIP" $pm.request.enabled }}
                        request_body_mode: {{ $reqBody }}
                        request_trailer_mode: {{ ternary "SEND" "SKIP" (eq $reqBody "FULL_DUPLEX_STREAMED") }}
                        response_header_mode: {{ ternary "SEND" "SKIP" $pm.response.enabled }}
                        response_body_mode: {{ $respBody }}
                        response_trailer_mode: {{ ternary "SEND" "SKIP" (eq $respBody "FULL_DUPLEX_STREAMED") }}
                      # What the plugins declare (extProc.metadata, processingMode.*.attributes), as envoy-config
                      # writes it: Envoy drops metadata in a namespace not named here and sends only these.
                      metadata_options:
                        receiving_namespaces: {untyped: {{ include "envoy-sidecar.receivingNamespaces" . }}}
                        {{- with .Values.extProc.metadata.accessibleNamespaces }}
                        forwarding_namespaces: {untyped: {{ toJson . }}}
                        {{- end }}
                      {{- with $pm.request.attributes }}
                      request_attributes: {{ toJson . }}
                      {{- end }}
                      {{- with $pm.response.attributes }}
                      response_attributes: {{ toJson . }}
                      {{- end }}
                      stat_prefix: sidecar
                  {{- end }}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: ready
      address:
        socket_address: {address: 0.0.0.0, port_value: {{ $s.envoy.readyPort }}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ready
                route_config:
                  name: ready
                  virtual_hosts:
                    - name: ready
                      domains: ["*"]
                      routes:
                        - match: {prefix: /}
                          direct_response: {status: 404}
                http_filters:
                  # 200 on /ready while serving, 503 once Envoy drains (SIGTERM or /healthcheck/fail).
                  - name: envoy.filters.http.health_check
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
                      pass_through_mode: false
                      headers:
                        - name: ":path"
                          string_match: {exact: /ready}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    {{- if not .Values.inProcess.enabled }}
    - name: envoy-sidecar
      type: STATIC
      connect_timeout: 0.250s
      circuit_breakers:
        thresholds: [{max_retries: 1024}]
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      load_assignment:
        cluster_name: envoy-sidecar
        endpoints:
          - lb_endpoints:
              {{- range $sockets }}
              - endpoint:
                  address:
                    pipe: {path: {{ . }}}
              {{- end }}
      {{- if gt (len $sockets) 1 }}
      # Several workers: stop opening streams on one that died or stalled (docs/reliability.md).
      health_checks:
        - timeout: 0.250s
          interval: 0.500s
          no_traffic_interval: 0.500s
          unhealthy_threshold: 1
          healthy_threshold: 1
          grpc_health_check: {service_name: envoy.service.ext_proc.v3.ExternalProcessor}
      outlier_detection:
        split_external_local_origin_errors: true
        consecutive_local_origin_failure: 1
        enforcing_consecutive_local_origin_failure: 100
        consecutive_gateway_failure: 2
        enforcing_consecutive_gateway_failure: 100
        interval: 1s
        base_ejection_time: 1s
        max_ejection_time: 30s
        max_ejection_percent: 50
      {{- end }}
    {{- end }}
    - name: upstream
      type: {{ ternary "STATIC" "STRICT_DNS" $isIP }}
      connect_timeout: 2s
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: {{ $s.upstream.host | quote }}, port_value: {{ $s.upstream.port }}}
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: {{ $s.envoy.adminPort }}}
{{- end -}}


{{/* The in-process filter: the chains run inside Envoy through the module in the sidecar image, which keeps it
(and the virtualenv Python imports from) at fixed paths (images/Dockerfile). The filter config is the JSON
`sidecar.inprocess.module.http_filter` writes; each hook's deadline is extProc.messageTimeout, as
`sidecar envoy-config --in-process` takes it from message_timeout. The filter is named after the chain. */}}
{{- define "envoy-sidecar.inProcessFilter" -}}
{{- $seconds := include "envoy-sidecar.protoDuration" .Values.extProc.messageTimeout | trimSuffix "s" | float64 -}}
{{- $config := dict "factory" "sidecar.inprocess.bridge:configure" "config" "/etc/envoy-sidecar/config/sidecar.yaml" "chain" "default" "site" (list "/opt/sidecar/site") "hook_deadline_ms" (round (mulf $seconds 1000) 0 | int) "max_body_bytes" (.Values.inProcess.maxBodyBytes | int) "max_python_bytes" (.Values.inProcess.maxPythonBytes | int64) -}}
name: sidecar.inprocess.default
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
  dynamic_module_config: {name: sidecar_inprocess, do_not_close: true}
  filter_name: default
  filter_config:
    "@type": type.googleapis.com/google.protobuf.StringValue
    value: {{ toJson $config | quote }}
{{- end -}}


{{/* Envoy's failure_mode_allow: the default chain's on_error decides (a fail_open chain fails open on
timeouts and an unreachable sidecar too); extProc.failOpen: true on a fail_closed chain is refused. */}}
{{- define "envoy-sidecar.failOpen" -}}
{{- $open := eq .Values.sidecar.onError "fail_open" -}}
{{- if and .Values.extProc.failOpen (not $open) -}}
{{- fail "extProc.failOpen: true would let requests through unprocessed when the fail_closed default chain times out or the sidecar is unreachable; set sidecar.onError: fail_open, or extProc.failOpen: false" -}}
{{- end -}}
{{- $open -}}
{{- end -}}


{{/* "200ms" / "2s" (Gateway API duration) -> "0.200s" / "2s" (protobuf Duration JSON). */}}
{{- define "envoy-sidecar.protoDuration" -}}
{{- if hasSuffix "ms" . -}}
{{- printf "%.3fs" (divf (trimSuffix "ms" . | float64) 1000) -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}
