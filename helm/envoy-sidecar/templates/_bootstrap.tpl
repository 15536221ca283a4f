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
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: {cluster_name: envoy-sidecar}
                        timeout: 5s
                      failure_mode_allow: {{ .Values.extProc.failOpen }}
                      message_timeout: {{ include "envoy-sidecar.protoDuration" .Values.extProc.messageTimeout }}
                      allow_mode_override: {{ .Values.extProc.allowModeOverride }}
                      processing_mode:
                        request_header_mode: {{ ternary "SEND" "SKIP" $pm.request.enabled }}
                        request_body_mode: {{ $reqBody }}
                        request_trailer_mode: {{ ternary "SEND" "SKIP" (eq $reqBody "FULL_DUPLEX_STREAMED") }}
                        response_header_mode: {{ ternary "SEND" "SKIP" $pm.response.enabled }}
                        response_body_mode: {{ $respBody }}
                        response_trailer_mode: {{ ternary "SEND" "SKIP" (eq $respBody "FULL_DUPLEX_STREAMED") }}
                      metadata_options:
                        receiving_namespaces: {untyped: [envoy-sidecar]}
                      stat_prefix: sidecar
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
    - name: envoy-sidecar
      type: STATIC
      connect_timeout: 1s
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
      health_checks:
        - timeout: 1s
          interval: 1s
          unhealthy_threshold: 1
          healthy_threshold: 1
          grpc_health_check: {service_name: envoy.service.ext_proc.v3.ExternalProcessor}
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


{{/* "200ms" / "2s" (Gateway API duration) -> "0.200s" / "2s" (protobuf Duration JSON). */}}
{{- define "envoy-sidecar.protoDuration" -}}
{{- if hasSuffix "ms" . -}}
{{- printf "%.3fs" (divf (trimSuffix "ms" . | float64) 1000) -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}
