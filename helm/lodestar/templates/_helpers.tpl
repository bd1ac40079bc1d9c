{{/* Names and labels. */}}
{{- define "lodestar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lodestar.fullname" -}}
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

{{/* The RayCluster's name: KubeRay names the head Service "<name>-head-svc". Short, so that
KubeRay's generated pod and service names stay within 63 characters. */}}
{{- define "lodestar.rayClusterName" -}}
{{- printf "%s-ray" (include "lodestar.fullname" . | trunc 40 | trimSuffix "-") -}}
{{- end -}}

{{/* The head's GCS, where every Ray node (worker pods, gateway pods) joins the cluster. */}}
{{- define "lodestar.rayHeadAddress" -}}
{{- printf "%s-head-svc:6379" (include "lodestar.rayClusterName" .) -}}
{{- end -}}

{{/* The release's one model fleet: named detached actors in Ray namespace "lodestar-<name>",
created by the gateway holding the Redis lease "fleet:<name>:owner" and found by name by the
others. */}}
{{- define "lodestar.fleetName" -}}
{{- include "lodestar.fullname" . -}}
{{- end -}}

{{- define "lodestar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lodestar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lodestar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "lodestar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* image: (dict "image" .Values.image "override" <group image or {}> "chart" .Chart) */}}
{{- define "lodestar.image" -}}
{{- $repo := default .image.repository .override.repository -}}
{{- $tag := default (default .chart.AppVersion .image.tag) .override.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "lodestar.pullPolicy" -}}
{{- default .image.pullPolicy .override.pullPolicy -}}
{{- end -}}

{{/* Secrets: one chart Secret holds whatever is not supplied as an existing Secret. */}}
{{- define "lodestar.secretName" -}}
{{- include "lodestar.fullname" . -}}
{{- end -}}

{{- define "lodestar.authSecret" -}}
{{- default (include "lodestar.secretName" .) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "lodestar.rayAuthSecret" -}}
{{- default (include "lodestar.secretName" .) .Values.ray.auth.existingSecret -}}
{{- end -}}

{{- define "lodestar.redisSecret" -}}
{{- default (include "lodestar.secretName" .) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "lodestar.redisHost" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "lodestar.fullname" .) -}}
{{- else -}}
{{- required "redis.external.host is required when redis.enabled is false" .Values.redis.external.host -}}
{{- end -}}
{{- end -}}

{{- define "lodestar.redisPort" -}}
{{- if .Values.redis.enabled -}}6379{{- else -}}{{ .Values.redis.external.port }}{{- end -}}
{{- end -}}

{{- define "lodestar.redisUrl" -}}
{{- printf "redis://%s:%s/%d" (include "lodestar.redisHost" .) (include "lodestar.redisPort" .) (int .Values.redis.db) -}}
{{- end -}}

{{/* Environment every Lodestar process gets: no hub access, the state store and its password. */}}
{{- define "lodestar.env" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
- name: LODESTAR_REDIS_URL
  value: {{ include "lodestar.redisUrl" . | quote }}
{{- if .Values.redis.auth.enabled }}
- name: LODESTAR_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "lodestar.redisSecret" . }}
      key: redis-password
{{- end }}
{{- end -}}

{{/* The gateway pod is a Ray node that KubeRay does not manage, so it gets by hand what KubeRay
injects into its worker pods: the Ray token, and with GCS fault tolerance a raylet that waits 600 s
(not 60) for a restarted head instead of exiting. */}}
{{- define "lodestar.gatewayRayEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "lodestar.rayAuthSecret" . }}
      key: auth_token
{{- end }}
{{- if .Values.ray.gcsFaultTolerance.enabled }}
- name: RAY_gcs_rpc_server_reconnect_timeout_s
  value: "600"
{{- end }}
{{- end -}}

{{/* A list of words as one POSIX shell line, each single-quoted when it needs it. */}}
{{- define "lodestar.shellWords" -}}
{{- $quoted := list -}}
{{- range . -}}
{{- if regexMatch "^[A-Za-z0-9_./=:,+@%-]+$" . -}}
{{- $quoted = append $quoted . -}}
{{- else -}}
{{- $quoted = append $quoted (printf "'%s'" (replace "'" "'\"'\"'" .)) -}}
{{- end -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{/* rayStartParams as `ray start` flags (a JSON list), written as KubeRay writes them: sorted,
"true" a bare flag, "false" left out (but for the flags that take a boolean), else --key=value. */}}
{{- define "lodestar.rayStartFlags" -}}
{{- $params := . -}}
{{- $flags := list -}}
{{- $valued := list "log-color" "include-dashboard" "include-log-monitor" -}}
{{- range $key := keys $params | sortAlpha -}}
{{- $value := toString (get $params $key) -}}
{{- if or (has $key $valued) (not (has (lower $value) (list "true" "false"))) -}}
{{- $flags = append $flags (printf "--%s=%s" $key $value) -}}
{{- else if eq (lower $value) "true" -}}
{{- $flags = append $flags (printf "--%s" $key) -}}
{{- end -}}
{{- end -}}
{{- toJson $flags -}}
{{- end -}}

{{/* GPUs one pod of a Ray group gives Ray, counted as KubeRay counts them: its num-gpus start
parameter, else its limits on a resource whose name ends in "gpu" (nvidia.com/gpu). */}}
{{- define "lodestar.podGpus" -}}
{{- $params := default (dict) .rayStartParams -}}
{{- if hasKey $params "num-gpus" -}}
{{- index $params "num-gpus" | float64 -}}
{{- else -}}
{{- $total := 0.0 -}}
{{- range $name, $count := (default (dict) (default (dict) .resources).limits) -}}
{{- if hasSuffix "gpu" $name -}}
{{- $total = addf $total $count -}}
{{- end -}}
{{- end -}}
{{- $total -}}
{{- end -}}
{{- end -}}

{{/* GPUs the fleet asks Ray for: numGpus for each reward actor, numGpus x tensorParallelSize for
each policy actor. Shared GPUs (numGpus 0.5) make this a lower bound. gateway.replicas is not in
it: every gateway uses the same fleet. */}}
{{- define "lodestar.fleetGpus" -}}
{{- $a := .Values.actors -}}
{{- mulf $a.numGpus (addf (mulf $a.policyWorkers $a.tensorParallelSize) $a.rewardWorkers) | ceil | int -}}
{{- end -}}

{{/* The most GPUs the RayCluster can hold: per group, its GPUs per pod x maxReplicas (replicas
without the autoscaler), plus the head's. */}}
{{- define "lodestar.clusterGpus" -}}
{{- $auto := .Values.head.enableInTreeAutoscaling -}}
{{- $groups := list -}}
{{- if not .Values.worker.disabled -}}
{{- $groups = append $groups .Values.worker -}}
{{- end -}}
{{- range $name, $group := .Values.additionalWorkerGroups -}}
{{- if not $group.disabled -}}
{{- $groups = append $groups $group -}}
{{- end -}}
{{- end -}}
{{- $total := include "lodestar.podGpus" .Values.head | float64 -}}
{{- range $groups -}}
{{- $pods := ternary .maxReplicas .replicas $auto -}}
{{- $total = addf $total (mulf $pods (include "lodestar.podGpus" . | float64)) -}}
{{- end -}}
{{- $total | floor | int -}}
{{- end -}}

{{/* Fail `helm install` / `helm template` (lint only logs a fail) when the worker groups can never
hold the fleet: the gateways would wait forever for actors the autoscaler cannot place. */}}
{{- define "lodestar.checkFleetFits" -}}
{{- $need := include "lodestar.fleetGpus" . | int -}}
{{- $have := include "lodestar.clusterGpus" . | int -}}
{{- if gt $need $have -}}
{{- $a := .Values.actors -}}
{{- fail (printf "the model fleet needs %d GPUs (actors.numGpus %v x (policyWorkers %v x tensorParallelSize %v + rewardWorkers %v)) but the Ray worker groups hold at most %d (GPUs per pod x maxReplicas): raise a GPU group's maxReplicas or shrink the fleet" $need $a.numGpus $a.policyWorkers $a.tensorParallelSize $a.rewardWorkers $have) -}}
{{- end -}}
{{- end -}}

{{- define "lodestar.modelVolume" -}}
{{- if .Values.models.volume }}
- name: models
{{- toYaml .Values.models.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "lodestar.modelVolumeMount" -}}
{{- if .Values.models.volume }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The model flags shared by `lodestar serve` and `lodestar batch run`. */}}
{{- define "lodestar.modelArgs" -}}
{{- with .Values.models.policy }}
- --policy
- {{ . | quote }}
{{- end }}
- --reward
- {{ .Values.models.reward | quote }}
{{- with .Values.models.prmFamily }}
- --prm-family
- {{ . | quote }}
{{- end }}
- --policy-workers
- {{ .Values.actors.policyWorkers | quote }}
- --reward-workers
- {{ .Values.actors.rewardWorkers | quote }}
- --num-gpus
- {{ .Values.actors.numGpus | quote }}
- --engine
- {{ .Values.actors.engine | quote }}
- --tensor-parallel-size
- {{ .Values.actors.tensorParallelSize | quote }}
{{- with .Values.actors.gpuMemoryUtilization }}
- --gpu-memory-utilization
- {{ . | quote }}
{{- end }}
{{- with .Values.actors.maxModelLen }}
- --max-model-len
- {{ . | int | quote }}
{{- end }}
{{- if .Values.actors.threads }}
- --threads
- {{ .Values.actors.threads | quote }}
{{- end }}
{{- end -}}

{{/* One Ray pod template: (dict "root" $ "group" <head or worker values> "name" "ray-head"|"ray-worker" "head" bool). */}}
{{- define "lodestar.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $group := .group -}}
metadata:
  labels:
    {{- include "lodestar.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ ternary "ray-head" "ray-worker" .head }}
    {{- with $group.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .name }}
      image: {{ include "lodestar.image" (dict "image" $root.Values.image "override" (default (dict) $group.image) "chart" $root.Chart) }}
      imagePullPolicy: {{ include "lodestar.pullPolicy" (dict "image" $root.Values.image "override" (default (dict) $group.image)) }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      env:
        {{- include "lodestar.env" $root | nindent 8 }}
        {{- with $group.containerEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if .head }}
      ports:
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
      {{- end }}
      resources:
        {{- toYaml $group.resources | nindent 8 }}
      volumeMounts:
        - name: shm
          mountPath: /dev/shm
        {{- include "lodestar.modelVolumeMount" $root | nindent 8 }}
        {{- if and .head .batch $root.Values.batch.dataVolume }}
        - name: data
          mountPath: {{ $root.Values.batch.dataMountPath }}
        {{- end }}
  volumes:
    # Ray's object store lives in shared memory; the container default (64 MiB) is far too small.
    - name: shm
      emptyDir:
        medium: Memory
    {{- include "lodestar.modelVolume" $root | nindent 4 }}
    {{- if and .head .batch $root.Values.batch.dataVolume }}
    - name: data
      {{- toYaml $root.Values.batch.dataVolume | nindent 6 }}
    {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* One worker group: (dict "root" $ "name" <groupName> "group" <values> "batch" bool). */}}
{{- define "lodestar.workerGroup" -}}
- groupName: {{ .name }}
  replicas: {{ .group.replicas }}
  minReplicas: {{ .group.minReplicas }}
  maxReplicas: {{ .group.maxReplicas }}
  rayStartParams:
    {{- toYaml (default (dict) .group.rayStartParams) | nindent 4 }}
  template:
    {{- include "lodestar.rayPodTemplate" (dict "root" .root "group" .group "name" "ray-worker" "head" false "batch" .batch) | nindent 4 }}
{{- end -}}

{{/* The RayCluster spec, shared by the RayCluster and the batch RayJob's rayClusterSpec. */}}
{{- define "lodestar.rayClusterSpec" -}}
{{- $root := .root -}}
rayVersion: {{ $root.Values.ray.version | quote }}
{{- if $root.Values.ray.auth.enabled }}
authOptions:
  mode: token
  secretName: {{ include "lodestar.rayAuthSecret" $root }}
{{- end }}
enableInTreeAutoscaling: {{ $root.Values.head.enableInTreeAutoscaling }}
{{- if $root.Values.head.enableInTreeAutoscaling }}
autoscalerOptions:
  {{- toYaml $root.Values.head.autoscalerOptions | nindent 2 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
{{- end }}
{{- if $root.Values.ray.gcsFaultTolerance.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ printf "%s:%s" (include "lodestar.redisHost" $root) (include "lodestar.redisPort" $root) | quote }}
  {{- if $root.Values.redis.auth.enabled }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ include "lodestar.redisSecret" $root }}
        key: redis-password
  {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- toYaml (merge (dict "num-cpus" "0") $root.Values.head.rayStartParams) | nindent 4 }}
  template:
    {{- include "lodestar.rayPodTemplate" (dict "root" $root "group" $root.Values.head "name" "ray-head" "head" true "batch" .batch) | nindent 4 }}
workerGroupSpecs:
{{- if not $root.Values.worker.disabled }}
{{- include "lodestar.workerGroup" (dict "root" $root "name" $root.Values.worker.groupName "group" $root.Values.worker "batch" .batch) | nindent 2 }}
{{- end }}
{{- range $name, $group := $root.Values.additionalWorkerGroups }}
{{- if not $group.disabled }}
{{- include "lodestar.workerGroup" (dict "root" $root "name" $name "group" $group "batch" $.batch) | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}
