{{/* ---------------------------------------------------------------- names */}}

{{- define "reflex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 63 characters (DNS label). When the release name
already contains the chart name it is used as is.
*/}}
{{- define "reflex.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "reflex.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "reflex.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reflex.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "reflex.labels" -}}
helm.sh/chart: {{ include "reflex.chart" . }}
{{ include "reflex.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
reflex.io/store-backend: {{ .Values.store.backend | quote }}
{{- end }}

{{- define "reflex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "reflex.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "reflex.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* The Secret that holds keys.toml, when auth is on. */}}
{{- define "reflex.authSecretName" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else -}}
{{- printf "%s-api-keys" (include "reflex.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/* "true" when the embedded profile is selected. */}}
{{- define "reflex.embedded" -}}
{{- if eq (toString .Values.store.backend) "embedded" }}true{{ end -}}
{{- end }}

{{/* "true" when more than one pod of the release can run at once. */}}
{{- define "reflex.multiReplica" -}}
{{- if and (not (include "reflex.embedded" .)) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}true{{ end -}}
{{- end }}

{{/* ---------------------------------------------------------- paths */}}
{{- define "reflex.configPath" -}}/etc/reflex/reflex.toml{{- end }}
{{- define "reflex.secretsDir" -}}/etc/reflex/secrets{{- end }}
{{- define "reflex.keysPath" -}}/etc/reflex/secrets/keys.toml{{- end }}
{{- define "reflex.dataDir" -}}/var/lib/reflex{{- end }}

{{/* ---------------------------------------------------- configuration */}}

{{/*
The effective server configuration as a dict: .Values.config with the keys the chart
owns laid over it (listen addresses, backend, data directory, keys file, and each pod's
share of botFilter.maxEventsPerUserPerSec).
*/}}
{{- define "reflex.configDict" -}}
{{- $cfg := mustMergeOverwrite (include "reflex.kafkaConfig" . | fromJson) (deepCopy (default (dict) .Values.config)) -}}
{{- $host := .Values.listenAddress | default "0.0.0.0" -}}
{{- $owned := dict "listen" (printf "%s:%d" $host (int .Values.ports.grpc)) -}}
{{- $_ := set $owned "metrics" (dict "listen" (printf "%s:%d" $host (int .Values.ports.metrics))) -}}
{{- $store := dict "backend" (toString .Values.store.backend) -}}
{{- if include "reflex.embedded" . -}}
{{- $_ := set $store "embedded" (dict "data_dir" (include "reflex.dataDir" .)) -}}
{{- end -}}
{{- $_ := set $owned "store" $store -}}
{{- $_ := set $owned "console" (dict "enabled" (.Values.console.enabled | default false)) -}}
{{- if .Values.auth.enabled -}}
{{- $_ := set $owned "auth" (dict "enabled" true "keys_file" (include "reflex.keysPath" .)) -}}
{{- end -}}
{{- $total := (default (dict) .Values.botFilter).maxEventsPerUserPerSec -}}
{{- if not (kindIs "invalid" $total) -}}
{{- $pods := 1 -}}
{{- if not (include "reflex.embedded" .) -}}
{{- $pods = ternary (int .Values.autoscaling.minReplicas) (int .Values.replicaCount) (and .Values.autoscaling.enabled true) -}}
{{- end -}}
{{- $pods = max 1 $pods -}}
{{- $share := div (add (int $total) (sub $pods 1)) $pods -}}
{{- $_ := set $owned "engine" (dict "bot_filter" (dict "max_events_per_user_per_sec" $share)) -}}
{{- end -}}
{{- toJson (mustMergeOverwrite $cfg $owned) -}}
{{- end }}

{{/*
The server's `source.kafka` and `sink.kafka` sections from .Values.kafka (only those
enabled), as JSON; each .Values.kafka.secretProperties entry is named in both sections'
`secret_properties` as REFLEX_SECRET_KAFKA_<index> (see reflex.kafkaSecretEnv).
*/}}
{{- define "reflex.kafkaConfig" -}}
{{- $k := .Values.kafka -}}
{{- $secrets := dict -}}
{{- range $i, $s := $k.secretProperties -}}
{{- $_ := set $secrets $s.property (printf "REFLEX_SECRET_KAFKA_%d" $i) -}}
{{- end -}}
{{- $out := dict -}}
{{- if $k.source.enabled -}}
{{- $src := dict "enabled" true "brokers" $k.source.brokers "group_id" $k.source.groupId "topics" (default (dict) $k.source.topics) "format" $k.source.format "start" $k.source.start "dead_letter_topic" $k.source.deadLetterTopic "properties" (default (dict) $k.source.properties) "secret_properties" $secrets -}}
{{- $_ := set $out "source" (dict "kafka" $src) -}}
{{- end -}}
{{- if $k.sink.enabled -}}
{{- $sink := dict "enabled" true "brokers" (default $k.source.brokers $k.sink.brokers) "topic" $k.sink.topic "properties" (default (dict) $k.sink.properties) "secret_properties" $secrets -}}
{{- $_ := set $out "sink" (dict "kafka" $sink) -}}
{{- end -}}
{{- toJson $out -}}
{{- end }}

{{/* The environment variables of .Values.kafka.secretProperties, from their Secrets. */}}
{{- define "reflex.kafkaSecretEnv" -}}
{{- if or .Values.kafka.source.enabled .Values.kafka.sink.enabled -}}
{{- range $i, $s := .Values.kafka.secretProperties }}
- name: {{ printf "REFLEX_SECRET_KAFKA_%d" $i }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.secretName | quote }}
      key: {{ $s.secretKey | quote }}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The effective configuration as the TOML file the server reads. */}}
{{- define "reflex.configToml" -}}
# Rendered by the reflex Helm chart from .Values.config; `reflex config` prints the
# effective configuration (this file, then REFLEX_* environment variables, then flags).
{{ include "reflex.toml" (include "reflex.configDict" . | fromJson) }}
{{- end }}

{{/* keys.toml for a chart-managed API key Secret. */}}
{{- define "reflex.keysToml" -}}
# API keys for reflex, rendered by the Helm chart from .Values.auth.keys.
{{ include "reflex.toml" (dict "keys" .Values.auth.keys) }}
{{- end }}

{{/* ------------------------------------------------ TOML from a dict */}}

{{/*
reflex.toml renders a map as a TOML document:
  - scalars and lists of scalars first, as `key = value`, keys sorted;
  - nested maps as [a.b] tables (a header only where the table has its own keys or
    is empty, so pure parents stay implicit);
  - non-empty lists whose items are all maps as [[a.b]] arrays of tables;
  - maps inside mixed lists as inline tables;
  - strings as basic strings (JSON escaping is valid TOML), booleans as is, whole
    floats as integers (Helm reads every YAML number as a float, and the server's
    integer fields refuse 1000.0), other floats in Go's shortest form; null drops the
    key. Keys outside [A-Za-z0-9_-] are quoted.
*/}}
{{- define "reflex.toml" -}}
{{- include "reflex.toml.body" (dict "path" (list) "data" .) | trim -}}
{{- end }}

{{- define "reflex.toml.body" -}}
{{- $path := .path -}}
{{- $data := .data -}}
{{- range $k := keys $data | sortAlpha -}}
{{- $v := get $data $k -}}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "map" $v)) (not (include "reflex.toml.isTableArray" $v)) }}
{{ include "reflex.toml.key" $k }} = {{ include "reflex.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k := keys $data | sortAlpha -}}
{{- $v := get $data $k -}}
{{- $sub := append $path $k -}}
{{- if kindIs "map" $v -}}
{{- if or (not $v) (include "reflex.toml.hasKeys" $v) }}

[{{ include "reflex.toml.path" $sub }}]
{{- end -}}
{{- include "reflex.toml.body" (dict "path" $sub "data" $v) -}}
{{- else if include "reflex.toml.isTableArray" $v -}}
{{- range $item := $v }}

[[{{ include "reflex.toml.path" $sub }}]]
{{- include "reflex.toml.body" (dict "path" $sub "data" $item) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* "true" if the map has a key that is written inside its own table. */}}
{{- define "reflex.toml.hasKeys" -}}
{{- range $k, $v := . -}}
{{- if and (not (kindIs "invalid" $v)) (not (kindIs "map" $v)) (not (include "reflex.toml.isTableArray" $v)) }}true{{ end -}}
{{- end -}}
{{- end }}

{{- define "reflex.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}
{{- $all := true -}}
{{- range . -}}
{{- if not (kindIs "map" .) }}{{ $all = false }}{{ end -}}
{{- end -}}
{{- if $all }}true{{ end -}}
{{- end -}}
{{- end }}

{{- define "reflex.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end }}

{{- define "reflex.toml.path" -}}
{{- $parts := list -}}
{{- range . }}{{ $parts = append $parts (include "reflex.toml.key" .) }}{{ end -}}
{{- join "." $parts -}}
{{- end }}

{{- define "reflex.toml.value" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if and (eq (float64 $v) (floor $v)) (lt (float64 $v) 1e15) (gt (float64 $v) -1e15) -}}
{{- int64 $v -}}
{{- else -}}
{{- $v -}}
{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) (kindIs "uint32" $v) (kindIs "uint" $v) -}}
{{- $v -}}
{{- else if kindIs "slice" $v -}}
[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "reflex.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" $v -}}
{{- $items := list -}}
{{- range $k := keys $v | sortAlpha -}}
{{- $e := get $v $k -}}
{{- if not (kindIs "invalid" $e) -}}
{{- $items = append $items (printf "%s = %s" (include "reflex.toml.key" $k) (include "reflex.toml.value" $e)) -}}
{{- end -}}
{{- end -}}
{ {{- join ", " $items -}} }
{{- else -}}
{{- fail (printf "config: %v (%s) cannot be written as TOML (a null inside a list?)" $v (kindOf $v)) -}}
{{- end -}}
{{- end }}

{{/* ------------------------------------------------------- validation */}}

{{- define "reflex.validate" -}}
{{- $backend := toString .Values.store.backend -}}
{{- if .Values.kafka.source.enabled -}}
{{- if or (not .Values.kafka.source.brokers) (not .Values.kafka.source.topics) -}}
{{- fail "kafka.source.enabled needs kafka.source.brokers (host:port,...) and kafka.source.topics (topic: kind)." -}}
{{- end -}}
{{- end -}}
{{- if and .Values.kafka.sink.enabled (not (or .Values.kafka.sink.brokers .Values.kafka.source.brokers)) -}}
{{- fail "kafka.sink.enabled needs kafka.sink.brokers (or kafka.source.brokers)." -}}
{{- end -}}
{{- if not (has $backend (list "embedded" "redis" "scylla")) -}}
{{- fail (printf "store.backend must be one of embedded, redis, scylla (got %q)" $backend) -}}
{{- end -}}
{{- if include "reflex.embedded" . -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- fail (printf "store.backend=embedded keeps all state on one pod's volume and runs exactly one replica, but replicaCount is %d. Set replicaCount: 1, or use store.backend=redis or scylla (values-redis.yaml, values-scylla.yaml) to run many replicas." (int .Values.replicaCount)) -}}
{{- end -}}
{{- if .Values.autoscaling.enabled -}}
{{- fail "store.backend=embedded runs exactly one replica and cannot be autoscaled: set autoscaling.enabled=false, or use store.backend=redis or scylla." -}}
{{- end -}}
{{- end -}}
{{- if eq $backend "redis" -}}
{{- $url := dig "store" "redis" "url" "" (default (dict) .Values.config) -}}
{{- if and (not .Values.store.redis.urlSecret.name) (not $url) -}}
{{- fail "store.backend=redis needs store.redis.urlSecret.name (a Secret with the Redis URL) or config.store.redis.url." -}}
{{- end -}}
{{- end -}}
{{- if eq $backend "scylla" -}}
{{- $points := dig "store" "scylla" "contact_points" list (default (dict) .Values.config) -}}
{{- if not $points -}}
{{- fail "store.backend=scylla needs config.store.scylla.contact_points (a list of host:port)." -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%d) exceeds autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- if and (not .Values.auth.existingSecret) (not .Values.auth.keys) -}}
{{- fail "auth.enabled needs auth.existingSecret (a Secret with key keys.toml) or a list of auth.keys." -}}
{{- end -}}
{{- if not .Values.auth.existingSecret -}}
{{- range $i, $k := .Values.auth.keys -}}
{{- if or (not (kindIs "map" $k)) (not $k.name) (not $k.key) (not $k.scopes) -}}
{{- fail (printf "auth.keys[%d] needs name, key and scopes" $i) -}}
{{- end -}}
{{- if lt (len (toString $k.key)) 16 -}}
{{- fail (printf "auth.keys[%d] (%s): the server refuses keys shorter than 16 characters" $i $k.name) -}}
{{- end -}}
{{- range $k.scopes -}}
{{- if not (has . (list "ingest" "recommend" "admin")) -}}
{{- fail (printf "auth.keys[%d] (%s): unknown scope %q; scopes are ingest, recommend, admin" $i $k.name .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $graceMs := int64 (dig "shutdown_grace_ms" 10000 (default (dict) .Values.config)) -}}
{{- $delayMs := int64 (dig "drain_delay_ms" 0 (default (dict) .Values.config)) -}}
{{- $budgetMs := mul (int64 .Values.terminationGracePeriodSeconds) 1000 -}}
{{- $needMs := add (mul (int64 (default 0 .Values.preStopSleepSeconds)) 1000) $delayMs $graceMs -}}
{{- if le $budgetMs $needMs -}}
{{- fail (printf "terminationGracePeriodSeconds (%ds) must exceed preStopSleepSeconds (%ds) + config.drain_delay_ms (%dms) + config.shutdown_grace_ms (%dms), or Kubernetes kills the server before it has drained and written its final checkpoint." (int64 .Values.terminationGracePeriodSeconds) (int64 (default 0 .Values.preStopSleepSeconds)) $delayMs $graceMs) -}}
{{- end -}}
{{- if not (has (toString .Values.podAntiAffinity) (list "soft" "hard" "")) -}}
{{- fail (printf "podAntiAffinity must be soft, hard or empty (got %q)" (toString .Values.podAntiAffinity)) -}}
{{- end -}}
{{- end }}

{{/* ------------------------------------------------------------ probes */}}

{{/* A probe from values, with grpc.port pinned to the gRPC port. */}}
{{- define "reflex.probe" -}}
{{- $probe := deepCopy (default (dict) .probe) -}}
{{- if hasKey $probe "grpc" -}}
{{- if kindIs "invalid" $probe.grpc -}}
{{- $_ := unset $probe "grpc" -}}
{{- else -}}
{{- $_ := set $probe.grpc "port" (int .port) -}}
{{- end -}}
{{- end -}}
{{- toYaml $probe -}}
{{- end }}

{{/* ---------------------------------------------------- pod template */}}

{{- define "reflex.podTemplate" -}}
metadata:
  labels:
    {{- include "reflex.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "reflex.configToml" . | sha256sum }}
    {{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
    checksum/api-keys: {{ include "reflex.keysToml" . | sha256sum }}
    {{- end }}
    {{- if .Values.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ .Values.ports.metrics | int | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "reflex.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  enableServiceLinks: {{ .Values.enableServiceLinks }}
  terminationGracePeriodSeconds: {{ int64 .Values.terminationGracePeriodSeconds }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: reflex
      image: {{ include "reflex.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve"]
      ports:
        - name: grpc
          containerPort: {{ .Values.ports.grpc | int }}
          protocol: TCP
        - name: metrics
          containerPort: {{ .Values.ports.metrics | int }}
          protocol: TCP
      env:
        - name: REFLEX_CONFIG
          value: {{ include "reflex.configPath" . | quote }}
        {{- if and (eq (toString .Values.store.backend) "redis") .Values.store.redis.urlSecret.name }}
        - name: REFLEX_STORE__REDIS__URL
          valueFrom:
            secretKeyRef:
              name: {{ .Values.store.redis.urlSecret.name | quote }}
              key: {{ .Values.store.redis.urlSecret.key | quote }}
        {{- end }}
        {{- if and (eq (toString .Values.store.backend) "scylla") .Values.store.scylla.credentialsSecret.name }}
        - name: REFLEX_STORE__SCYLLA__USERNAME
          valueFrom:
            secretKeyRef:
              name: {{ .Values.store.scylla.credentialsSecret.name | quote }}
              key: {{ .Values.store.scylla.credentialsSecret.usernameKey | quote }}
        - name: REFLEX_SECRET_SCYLLA_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ .Values.store.scylla.credentialsSecret.name | quote }}
              key: {{ .Values.store.scylla.credentialsSecret.passwordKey | quote }}
        - name: REFLEX_STORE__SCYLLA__PASSWORD_ENV
          value: REFLEX_SECRET_SCYLLA_PASSWORD
        {{- end }}
        {{- include "reflex.kafkaSecretEnv" . | nindent 8 }}
        {{- with .Values.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.startupProbe }}
      startupProbe:
        {{- include "reflex.probe" (dict "probe" . "port" $.Values.ports.grpc) | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        {{- include "reflex.probe" (dict "probe" . "port" $.Values.ports.grpc) | nindent 8 }}
      {{- end }}
      {{- with .Values.livenessProbe }}
      livenessProbe:
        {{- include "reflex.probe" (dict "probe" . "port" $.Values.ports.grpc) | nindent 8 }}
      {{- end }}
      {{- if gt (int .Values.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ int64 .Values.preStopSleepSeconds }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ include "reflex.configPath" . }}
          subPath: reflex.toml
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if .Values.auth.enabled }}
        # A directory mount (no subPath), so a rotated Secret reaches the pod.
        - name: api-keys
          mountPath: {{ include "reflex.secretsDir" . }}
          readOnly: true
        {{- end }}
        {{- if include "reflex.embedded" . }}
        - name: data
          mountPath: {{ include "reflex.dataDir" . }}
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "reflex.fullname" . }}
    - name: tmp
      emptyDir:
        {{- with .Values.tmpSizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- if .Values.auth.enabled }}
    - name: api-keys
      secret:
        secretName: {{ include "reflex.authSecretName" . }}
        defaultMode: 0440
        items:
          - key: {{ if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey | default "keys.toml" }}{{ else }}keys.toml{{ end }}
            path: keys.toml
    {{- end }}
    {{- if and (include "reflex.embedded" .) (not .Values.store.embedded.persistence.enabled) }}
    - name: data
      emptyDir: {}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if .Values.affinity }}
  affinity:
    {{- toYaml .Values.affinity | nindent 4 }}
  {{- else if eq (toString .Values.podAntiAffinity) "soft" }}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "reflex.selectorLabels" . | nindent 16 }}
  {{- else if eq (toString .Values.podAntiAffinity) "hard" }}
  affinity:
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        - topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "reflex.selectorLabels" . | nindent 14 }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range . }}
    {{- $c := deepCopy . }}
    {{- if not (hasKey $c "labelSelector") }}
    {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "reflex.selectorLabels" $ | fromYaml)) }}
    {{- end }}
    - {{- toYaml $c | nindent 6 }}
    {{- end }}
  {{- end }}
{{- end }}
